"""Model builders: the study's `baseline`, `cnn` and `resnet50`, and the ImageNet-pretrained
`efficientnet_lite0` / `efficientnet_lite2` (see `backbones.py`).

Every model is `GenreNet(backbone, head)` and returns logits: sigmoid and thresholds are post-processing.
The split into backbone and head is what fine-tuning needs (frozen backbone first, lower backbone LR).
Each arch has its own preprocessing (`default_preprocess`): a pretrained backbone's is the one it was trained with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from genre_pipeline.data import storage
from genre_pipeline.data.images import PreprocessSpec
from genre_pipeline.model.backbones import (
    LITE_VARIANTS,
    LiteFeatures,
    WeightsUnavailableError,
    create_lite,
    lite_input_config,
    load_lite_weights,
    package_version,
    package_weights_file,
    read_state_dict,
)

logger = logging.getLogger(__name__)

__all__ = ["ARCHS", "PRETRAINED_ARCHS", "GenreNet", "WeightsUnavailableError", "build_model", "default_preprocess",
           "weights_source"]

# The study's input sizes: 256x256 for its CNN, ResNet50's ImageNet 224.
_STUDY_IMAGE_SIZE = {"baseline": 128, "cnn": 256, "resnet50": 224}
PRETRAINED_ARCHS = tuple(LITE_VARIANTS)  # pretrained by default: their weights ship in installed packages
ARCHS = (*_STUDY_IMAGE_SIZE, *PRETRAINED_ARCHS)
RESNET50_IMAGENET = "ResNet50_Weights.IMAGENET1K_V2"
# The Lite stages whose pooled outputs join the last convolution's as the head's features (the last three).
LITE_POOLED_BLOCKS = (4, 5, 6)


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

    weights = ResNet50_Weights.IMAGENET1K_V2 if imagenet else None  # RESNET50_IMAGENET
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


def lite_backbone(arch: str, imagenet: bool, pooled_blocks: tuple[int, ...] = LITE_POOLED_BLOCKS) -> LiteFeatures:
    """A Lite feature extractor, with the ImageNet weights of its package when `imagenet`."""
    network = create_lite(arch)
    if imagenet:
        path = package_weights_file(arch)
        state, _ = read_state_dict(str(path), storage.StorageOptions())
        load_lite_weights(network, state, str(path))
    return LiteFeatures(network, pooled_blocks)


def _efficientnet_lite(arch: str, num_genres: int, imagenet: bool, pooled_blocks: tuple[int, ...]) -> GenreNet:
    backbone = lite_backbone(arch, imagenet, pooled_blocks)
    # Dropout before one linear layer per genre: on 2.6k posters a deeper head overfits the frozen features.
    head = nn.Sequential(nn.Dropout(0.3), nn.Linear(backbone.feature_width, num_genres))
    return GenreNet(backbone, head)


_BUILDERS: dict[str, Callable[[int, bool], GenreNet]] = {
    "baseline": lambda n, imagenet: _baseline(n),
    "cnn": lambda n, imagenet: _cnn(n),
    "resnet50": _resnet50,
}


# Posters are 2:3 (MovieLens': 300 x 443-460). A pretrained backbone pools globally, so it takes the whole poster,
# near its own size and above ImageNet's training width (objects look larger in training's random crops; see
# docs/results.md for what each size scored), instead of a squashed square.
POSTER_HEIGHT_PER_WIDTH = 1.5
PRETRAINED_POSTER_WIDTH = 288


def default_preprocess(arch: str, width: int | None = None) -> PreprocessSpec:
    """The arch's input size, mean and std: for a pretrained backbone a whole poster (288x432) with its own mean
    and std; the study's square sizes for the others. `width` overrides the arch's."""
    if arch in LITE_VARIANTS:
        config = lite_input_config(arch)
        width = width or PRETRAINED_POSTER_WIDTH
        height = 8 * round(width * POSTER_HEIGHT_PER_WIDTH / 8)
        return PreprocessSpec(image_size=width, image_height=height, mean=config["mean"], std=config["std"])
    if arch not in _STUDY_IMAGE_SIZE:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    return PreprocessSpec(image_size=width or _STUDY_IMAGE_SIZE[arch])


def build_model(
    *, arch: str, num_genres: int, pretrained: bool = False, weights: str | None = None,
    storage_options: storage.StorageOptions = storage.StorageOptions(), pooled_blocks: tuple[int, ...] | None = None,
) -> GenreNet:
    """A fresh model. `pretrained`: the arch's ImageNet weights (an installed package for the EfficientNet-Lites,
    torchvision's download for resnet50); `weights`: a backbone state_dict file instead (path or s3://).
    `pooled_blocks`: a Lite backbone's stages pooled into its features (default `LITE_POOLED_BLOCKS`; a
    checkpoint passes the ones it was trained with)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    if (pretrained or weights) and arch not in ("resnet50", *LITE_VARIANTS):
        raise WeightsUnavailableError(
            f"no pretrained weights exist for arch {arch!r}; only resnet50 and {', '.join(LITE_VARIANTS)} have them")
    imagenet = pretrained and weights is None
    if arch in LITE_VARIANTS:
        model = _efficientnet_lite(arch, num_genres, imagenet,
                                   LITE_POOLED_BLOCKS if pooled_blocks is None else tuple(pooled_blocks))
    elif pooled_blocks:
        raise ValueError(f"pooled_blocks applies to {', '.join(LITE_VARIANTS)}, not {arch!r}")
    else:
        model = _BUILDERS[arch](num_genres, imagenet)
    if weights:
        load_backbone_weights(model, arch, weights, storage_options)
    return model


def load_backbone_weights(model: GenreNet, arch: str, uri: str, options: storage.StorageOptions) -> None:
    """Load an ImageNet-style state_dict into the backbone; its classifier (fc.* / _fc.* / classifier.*) is dropped."""
    state, _ = read_state_dict(uri, options)
    if arch in LITE_VARIANTS:
        load_lite_weights(model.backbone, state, uri)
    else:
        state = {key: value for key, value in state.items() if not key.startswith("fc.")}
        missing, unexpected = model.backbone.load_state_dict(state, strict=False)
        if unexpected or missing:
            raise WeightsUnavailableError(
                f"{uri}: not a ResNet50 state_dict (missing {missing[:3]}..., unexpected {unexpected[:3]}...)"
            )
    logger.info("loaded backbone weights from %s", uri)


def weights_source(*, arch: str, pretrained: bool, weights: str | None,
                   options: storage.StorageOptions = storage.StorageOptions()) -> dict[str, str]:
    """Where a run's initial weights came from, for its checkpoint: a file and its sha256, a package, or random."""
    if weights:
        return {"kind": "file", "uri": storage.redact(weights), "sha256": read_state_dict(weights, options)[1]}
    if not pretrained:
        return {"kind": "random"}
    if arch == "resnet50":
        return {"kind": "torchvision", "weights": RESNET50_IMAGENET}
    path = package_weights_file(arch)
    package = LITE_VARIANTS[arch].package
    return {"kind": "package", "package": f"{package}=={package_version(package)}", "file": path.name,
            "sha256": read_state_dict(str(path), options)[1]}
