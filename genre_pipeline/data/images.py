"""Poster decoding and resizing, shared by training and inference (normalising: `tensors.py`, augmenting:
`train/augmentation.py`).

Everything is driven by a `PreprocessSpec` stored in the checkpoint, so the label job preprocesses exactly
as training did and never takes these settings from its command line. Free of torch on purpose: Ray Data's
fetch workers import this module, and torch would add hundreds of MB and seconds of start-up to each (the
resize imports torch when first called).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageFile

# Truncated files must fail loudly (status unreadable_poster), not decode as half-grey pictures.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# 40 megapixels: 30 times a 4k poster scan's area, and about 120 MB decoded as RGB, which bounds decode time too.
MAX_POSTER_PIXELS = 40_000_000
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PosterDecodeError(ValueError):
    """Bytes that are not a readable image."""


Size = int | tuple[int, int]  # a square side, or (height, width)


def as_shape(size: Size) -> tuple[int, int]:
    """(height, width) of a size given as a square side or as (height, width)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@dataclass(frozen=True)
class PreprocessSpec:
    image_size: int  # width fed to the model (and height, unless image_height): squashed, not cropped, to keep it all
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    image_height: int | None = None  # a poster-shaped input (taller than wide); None: square

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the model's input."""
        return (self.image_height or self.image_size, self.image_size)

    def describe(self) -> str:
        height, width = self.shape
        return f"{width}x{height} px (width x height), mean {self.mean}, std {self.std}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        height = data.get("image_height")  # absent in checkpoints from before poster-shaped inputs
        return cls(image_size=int(data["image_size"]), mean=tuple(data["mean"]), std=tuple(data["std"]),
                   image_height=None if height is None else int(height))


def decode_poster(data: bytes, size: Size, out: np.ndarray | None = None) -> np.ndarray:
    """Bytes -> RGB uint8 array (height, width, 3) of `size`, written into `out` when given (a row of a batch);
    raises PosterDecodeError.

    JPEG draft mode lets libjpeg downscale in the DCT domain (by 1/2, 1/4, 1/8) before the resize, which makes
    decoding several times cheaper for large posters at no visible cost once resized.
    """
    if not data:
        raise PosterDecodeError("empty file (0 bytes)")
    height, width = as_shape(size)
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_pixels(image)
            image.draft("RGB", (width, height))
            rgb = np.asarray(to_rgb(image), dtype=np.uint8)
    except PosterDecodeError:
        raise
    except Exception as error:  # any decoder's failure (NotImplementedError, MemoryError, ...) is this poster's
        raise PosterDecodeError(f"cannot decode image: {type(error).__name__}: {error}") from None
    return resize_rgb(rgb, size, out)


def check_pixels(image: Image.Image) -> None:
    """Refuse, from the header alone, an image whose decoded size would dwarf any poster (a decompression bomb:
    a few KB of PNG can declare gigabytes of pixels)."""
    pixels = image.width * image.height
    if pixels > MAX_POSTER_PIXELS:
        raise PosterDecodeError(f"{image.width}x{image.height} pixels is more than a poster's "
                                f"{MAX_POSTER_PIXELS:,}: not decoded")


def resize_rgb(rgb: np.ndarray, size: Size, out: np.ndarray | None = None) -> np.ndarray:
    """H×W×3 uint8 -> `size` (squashed, not cropped), bilinear with antialiasing like PIL's, written into
    `out` (height×width×3 uint8, C-contiguous) when given.

    torch's uint8 AVX kernel does it in a quarter of PIL's time, within one grey level of PIL. It writes straight
    into an H×W×3 buffer through the `.out` overload: `interpolate` returns planar NCHW, and turning that back
    into H×W×3 would cost as much as the resize. Imported here, not at the top: fetch workers never resize.
    """
    height, width = as_shape(size)
    if out is None:
        out = np.empty((height, width, 3), dtype=np.uint8)
    if rgb.shape[:2] == (height, width):
        out[...] = rgb
        return out
    import torch

    with torch.inference_mode(), warnings.catch_warnings():
        # PIL's arrays are read-only; the resize only reads them, so torch's "not writable" warning is noise.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        source = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)
        target = torch.from_numpy(out).permute(2, 0, 1).unsqueeze(0)  # a channels-last view of `out`
        torch.ops.aten._upsample_bilinear2d_aa.out(source, [height, width], False, None, None, out=target)
    return out


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode (CMYK, grey, grey+alpha, palette, RGBA) -> RGB; transparency is composited on white."""
    image.load()
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # convert would copy an RGB image
