"""Training augmentation of uint8 image batches (torchvision v2 transforms)."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2

from genre_pipeline.data.images import Size, as_shape


def training_augmentation(image_size: Size) -> v2.Compose:
    """The study's augmentations, on uint8 CHW tensors: random resized crop, flip, colour jitter. Crops keep
    within a third of the input's own aspect ratio, so a poster-shaped input sees poster-shaped crops."""
    height, width = as_shape(image_size)
    aspect = width / height
    return v2.Compose(
        [
            v2.RandomResizedCrop((height, width), scale=(0.6, 1.0), ratio=(aspect * 3 / 4, aspect * 4 / 3),
                                 antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        ]
    )


def augment_batch(images: np.ndarray, augmentation: v2.Compose) -> np.ndarray:
    """Augment a uint8 NHWC batch image by image (each gets its own random parameters)."""
    tensors = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    augmented = torch.stack([augmentation(t) for t in tensors])
    return augmented.permute(0, 2, 3, 1).contiguous().numpy()
