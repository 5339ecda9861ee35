"""Model builders (`baseline`, `cnn`, `resnet50`) and self-describing checkpoints.

Every model is `GenreNet(backbone, head)` and returns logits: sigmoid and thresholds are post-processing.
The split into backbone and head is what fine-tuning needs (frozen backbone first, lower backbone LR).
"""

from __future__ import annotations

import io
import logging
import pickle
from collections.abc import Callable

import torch
from torch import nn

from genre_pipeline import storage

logger = logging.getLogger(__name__)

# The study's input sizes: 256x256 for its CNN, ResNet50's ImageNet 224.
DEFAULT_IMAGE_SIZE = {"baseline": 128, "cnn": 256, "resnet50": 224}
ARCHS = tuple(DEFAULT_IMAGE_SIZE)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for and cannot be had."""


class GenreNet(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def _baseline(num_genres: int) -> GenreNet:
    # The study's baseline: barely a model; it shows what "learning nothing" scores.
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    return GenreNet(backbone, nn.Linear(8, num_genres))


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),  # lets a from-scratch CNN train at a useful LR on small data
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


def _cnn(num_genres: int) -> GenreNet:
    # The study's CNN shape (conv + max-pool blocks, flatten, dense, dropout). Narrow early layers keep it
    # trainable on a CPU; the final pool to 4x4 makes the dense layer independent of the input size.
    widths = (16, 32, 64, 128, 128)
    blocks = [_conv_block(i, o) for i, o in zip((3, *widths[:-1]), widths, strict=True)]
    backbone = nn.Sequential(*blocks, nn.AdaptiveMaxPool2d(4), nn.Flatten())
    head = nn.Sequential(
        nn.Linear(widths[-1] * 16, 256), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(256, num_genres)
    )
    return GenreNet(backbone, head)


def _resnet50(num_genres: int, imagenet: bool) -> GenreNet:
    from torchvision.models import ResNet50_Weights, resnet50

    weights = ResNet50_Weights.IMAGENET1K_V2 if imagenet else None
    try:
        backbone = resnet50(weights=weights)
    except Exception as error:  # urllib, SSL, HTTP, hash errors: all mean "not downloadable here"
        raise WeightsUnavailableError(
            f"cannot download torchvision's ImageNet ResNet50 weights ({error}). Offline, pass --weights "
            "PATH_OR_S3_URI to a ResNet50 state_dict file (e.g. torchvision's resnet50-11ad3fa6.pth), or put "
            "that file in $TORCH_HOME/hub/checkpoints/ on every node."
        ) from None
    backbone.fc = nn.Identity()
    # The study's head.
    head = nn.Sequential(nn.Linear(2048, 1024), nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(1024, num_genres))
    return GenreNet(backbone, head)


_BUILDERS: dict[str, Callable[..., GenreNet]] = {
    "baseline": lambda n, imagenet: _baseline(n),
    "cnn": lambda n, imagenet: _cnn(n),
    "resnet50": _resnet50,
}


def build_model(
    *, arch: str, num_genres: int, pretrained: bool = False, weights: str | None = None,
    storage_options: storage.StorageOptions = storage.StorageOptions(),
) -> GenreNet:
    """A fresh model. `pretrained`: torchvision's ImageNet weights; `weights`: a backbone state_dict file."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    if (pretrained or weights) and arch != "resnet50":
        raise WeightsUnavailableError(f"no pretrained weights exist for arch {arch!r}; only resnet50 has them")
    model = _BUILDERS[arch](num_genres, pretrained and weights is None)
    if weights:
        load_backbone_weights(model, weights, storage_options)
    return model


def load_backbone_weights(model: GenreNet, uri: str, options: storage.StorageOptions) -> None:
    """Load an ImageNet-style state_dict into the backbone; its classifier (fc.*) is dropped."""
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(uri, options)), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        raise WeightsUnavailableError(f"{uri}: cannot read weights file: {error}") from None
    state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise WeightsUnavailableError(
            f"{uri}: not a ResNet50 state_dict (missing {missing[:3]}..., unexpected {unexpected[:3]}...)"
        )
    logger.info("loaded backbone weights from %s", uri)
