"""Image batches as model input: uint8 NHWC -> normalised float NCHW (torch only: scoring never imports
torchvision, which costs an actor more than a second of start-up)."""

from __future__ import annotations

import torch

from genre_pipeline.data.images import PreprocessSpec


def to_model_input(images: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 NHWC batch -> normalised float NCHW in channels_last memory (faster convolutions on CPU and GPU).

    NHWC uint8 permuted to NCHW *is* channels_last already, so no copy is made before the float conversion.
    """
    mean = torch.tensor(spec.mean, device=images.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(spec.std, device=images.device).view(1, 3, 1, 1) * 255.0
    batch = images.permute(0, 3, 1, 2).float()
    return ((batch - mean) / std).contiguous(memory_format=torch.channels_last)
