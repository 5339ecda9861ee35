"""Poster decoding, resizing, normalisation and augmentation, shared by training and inference.

Everything is driven by a `PreprocessSpec` stored in the checkpoint, so the label job preprocesses exactly
as training did and never takes these settings from its command line.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torchvision.transforms import v2

# Truncated files must fail loudly (status unreadable_poster), not decode as half-grey pictures.
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PosterDecodeError(ValueError):
    """Bytes that are not a readable image."""


@dataclass(frozen=True)
class PreprocessSpec:
    image_size: int  # square side fed to the model: posters are squashed, not cropped, to keep all of them
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        return cls(image_size=int(data["image_size"]), mean=tuple(data["mean"]), std=tuple(data["std"]))


def decode_poster(data: bytes, image_size: int) -> np.ndarray:
    """Bytes -> RGB uint8 array (image_size, image_size, 3); raises PosterDecodeError.

    JPEG draft mode lets libjpeg downscale in the DCT domain (by 1/2, 1/4, 1/8) before the resize, which makes
    decoding several times cheaper for large posters at no visible cost once resized.
    """
    if not data:
        raise PosterDecodeError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (image_size, image_size))
            rgb = to_rgb(image)
            resized = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=None)
            return np.asarray(resized, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise PosterDecodeError(f"cannot decode image: {error}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode (CMYK, grey, grey+alpha, palette, RGBA) -> RGB; transparency is composited on white."""
    image.load()
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def to_model_input(images: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 NHWC batch -> normalised float NCHW in channels_last memory (faster convolutions on CPU and GPU).

    NHWC uint8 permuted to NCHW *is* channels_last already, so no copy is made before the float conversion.
    """
    mean = torch.tensor(spec.mean, device=images.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(spec.std, device=images.device).view(1, 3, 1, 1) * 255.0
    batch = images.permute(0, 3, 1, 2).float()
    return ((batch - mean) / std).contiguous(memory_format=torch.channels_last)


def training_augmentation(image_size: int) -> v2.Compose:
    """The study's augmentations, on uint8 CHW tensors: random resized crop, flip, colour jitter."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        ]
    )


def augment_batch(images: np.ndarray, augmentation: v2.Compose) -> np.ndarray:
    """Augment a uint8 NHWC batch image by image (each gets its own random parameters)."""
    tensors = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    augmented = torch.stack([augmentation(t) for t in tensors])
    return augmented.permute(0, 2, 3, 1).contiguous().numpy()
