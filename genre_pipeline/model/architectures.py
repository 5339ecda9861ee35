"""Model builders, as a registry of architectures: the study's `baseline`, `cnn` and `resnet50`, and the
ImageNet-pretrained `efficientnet_lite0` / `efficientnet_lite2` (see `backbones.py`).

Each `Architecture` (timm's `register_model` + `pretrained_cfg`, in small) says how to build the network, its
default preprocessing, where its ImageNet weights come from and how they load, and how its batch norms fold into
their convolutions for inference. `architecture(name)` looks one up; nothing else branches on the arch's name.

Every model is `GenreNet(backbone, head)` and returns logits: sigmoid and thresholds are post-processing.
The split into backbone and head is what fine-tuning needs (frozen backbone first, lower backbone LR).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from genre_pipeline.data import storage
from genre_pipeline.data.images import PreprocessSpec
from genre_pipeline.model.backbones import (
    LITE_VARIANTS,
    LiteFeatures,
    WeightsUnavailableError,
    create_lite,
    fold_lite_batch_norms,
    lite_input_config,
    load_lite_weights,
    package_version,
    package_weights_file,
    read_state_dict,
)

logger = logging.getLogger(__name__)

__all__ = ["ARCHS", "PRETRAINED_ARCHS", "Architecture", "GenreNet", "WeightsUnavailableError", "architecture",
           "build_model", "default_preprocess", "fold_batchnorm", "register_architecture", "weights_source"]

RESNET50_IMAGENET = "ResNet50_Weights.IMAGENET1K_V2"
# The Lite stages whose pooled outputs join the last convolution's as the head's features (the last three).
LITE_POOLED_BLOCKS = (4, 5, 6)
# Posters are 2:3 (MovieLens': 300 x 443-460). A pretrained backbone pools globally, so it takes the whole poster,
# near its own size and above ImageNet's training width (objects look larger in training's random crops; see
# docs/results.md for what each size scored), instead of a squashed square.
POSTER_HEIGHT_PER_WIDTH = 1.5
PRETRAINED_POSTER_WIDTH = 288


class GenreNet(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


# (num_genres, imagenet, pooled_blocks) -> the model; `imagenet`: load the arch's own ImageNet weights.
Builder = Callable[[int, bool, "tuple[int, ...] | None"], GenreNet]


@dataclass(frozen=True)
class Architecture:
    """One model architecture: what builds it and everything that differs between archs.

    `pretrained`: its ImageNet weights are the default start (they ship in an installed package);
    `imagenet_source` (None: the arch has no ImageNet weights) says where they come from, for the checkpoint;
    `load_weights` loads a backbone state_dict file's tensors; `fold_batchnorm` folds an eval-mode model's batch
    norms into their convolutions (in place or as a new module; the result is what scores)."""

    name: str
    build: Builder
    preprocess: Callable[[int | None], PreprocessSpec]
    load_weights: Callable[[nn.Module, dict[str, torch.Tensor], str], None]
    fold_batchnorm: Callable[[nn.Module], nn.Module]
    imagenet_source: Callable[[storage.StorageOptions], dict[str, str]] | None = None
    pretrained: bool = False
    pools_stages: bool = False  # takes `pooled_blocks` (the Lites' stages pooled into the features)

    @property
    def has_imagenet_weights(self) -> bool:
        return self.imagenet_source is not None


_REGISTRY: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    if arch.name in _REGISTRY:
        raise ValueError(f"arch {arch.name!r} is registered already")
    _REGISTRY[arch.name] = arch
    return arch


def architecture(name: str) -> Architecture:
    """The registered arch `name`; ValueError naming the choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown arch {name!r}; choose one of {tuple(_REGISTRY)}") from None


# --- batch-norm folding and weight loading, per kind of network ---------------------------------------------------

def fx_fold_batchnorm(model: nn.Module) -> nn.Module:
    """torch.fx's generic folding (a traced copy); a model torch.fx cannot trace still scores, only unfolded."""
    from torch.fx.experimental.optimization import fuse as fx_fold  # torch's name for folding conv + batch norm

    try:
        return fx_fold(model)
    except Exception as error:
        logger.warning("scoring without folded batch norms: %s", error)
        return model


def lite_fold_batchnorm(model: nn.Module) -> nn.Module:
    """The Lite backbone's batch norms folded in place (torch.fx cannot trace timm's "same"-padding convolutions);
    a model without a backbone (a fusion model without the poster signal) has none to fold."""
    if model.backbone is not None:
        fold_lite_batch_norms(model.backbone)
    return model


def no_weights(model: nn.Module, state: dict[str, torch.Tensor], uri: str) -> None:
    raise AssertionError("unreachable: build_model refuses weights for an arch without ImageNet weights")


def load_resnet_weights(backbone: nn.Module, state: dict[str, torch.Tensor], uri: str) -> None:
    state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise WeightsUnavailableError(
            f"{uri}: not a ResNet50 state_dict (missing {missing[:3]}..., unexpected {unexpected[:3]}...)"
        )


# --- the study's architectures ------------------------------------------------------------------------------------

def _baseline(num_genres: int, imagenet: bool, pooled_blocks: tuple[int, ...] | None) -> GenreNet:
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


def _cnn(num_genres: int, imagenet: bool, pooled_blocks: tuple[int, ...] | None) -> GenreNet:
    # The study's CNN shape (conv + max-pool blocks, flatten, dense, dropout). Narrow early layers keep it
    # trainable on a CPU; the final pool to 4x4 makes the dense layer independent of the input size.
    widths = (16, 32, 64, 128, 128)
    blocks = [_conv_block(i, o) for i, o in zip((3, *widths[:-1]), widths, strict=True)]
    backbone = nn.Sequential(*blocks, nn.AdaptiveMaxPool2d(4), nn.Flatten())
    head = nn.Sequential(
        nn.Linear(widths[-1] * 16, 256), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(256, num_genres)
    )
    return GenreNet(backbone, head)


def _resnet50(num_genres: int, imagenet: bool, pooled_blocks: tuple[int, ...] | None) -> GenreNet:
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


def square_preprocess(size: int) -> Callable[[int | None], PreprocessSpec]:
    """The study's square input of `size` pixels (ImageNet's mean and std), or `width` when given."""
    return lambda width: PreprocessSpec(image_size=width or size)


register_architecture(Architecture("baseline", _baseline, square_preprocess(128), no_weights, fx_fold_batchnorm))
# The study's input sizes: 256x256 for its CNN, ResNet50's ImageNet 224.
register_architecture(Architecture("cnn", _cnn, square_preprocess(256), no_weights, fx_fold_batchnorm))
register_architecture(Architecture(
    "resnet50", _resnet50, square_preprocess(224), load_resnet_weights, fx_fold_batchnorm,
    imagenet_source=lambda options: {"kind": "torchvision", "weights": RESNET50_IMAGENET}))


# --- the EfficientNet-Lites ---------------------------------------------------------------------------------------

def lite_backbone(arch: str, imagenet: bool, pooled_blocks: tuple[int, ...] = LITE_POOLED_BLOCKS) -> LiteFeatures:
    """A Lite feature extractor, with the ImageNet weights of its package when `imagenet`."""
    network = create_lite(arch)
    if imagenet:
        path = package_weights_file(arch)
        state, _ = read_state_dict(str(path), storage.StorageOptions())
        load_lite_weights(network, state, str(path))
    return LiteFeatures(network, pooled_blocks)


def lite_builder(arch: str) -> Builder:
    def build(num_genres: int, imagenet: bool, pooled_blocks: tuple[int, ...] | None) -> GenreNet:
        backbone = lite_backbone(arch, imagenet, LITE_POOLED_BLOCKS if pooled_blocks is None else tuple(pooled_blocks))
        # Dropout before one linear layer per genre: on 2.6k posters a deeper head overfits the frozen features.
        head = nn.Sequential(nn.Dropout(0.3), nn.Linear(backbone.feature_width, num_genres))
        return GenreNet(backbone, head)

    return build


def lite_preprocess(arch: str) -> Callable[[int | None], PreprocessSpec]:
    """A whole poster (288x432 by default) with the backbone's own mean and std."""
    def preprocess(width: int | None) -> PreprocessSpec:
        config = lite_input_config(arch)
        width = width or PRETRAINED_POSTER_WIDTH
        height = 8 * round(width * POSTER_HEIGHT_PER_WIDTH / 8)
        return PreprocessSpec(image_size=width, image_height=height, mean=config["mean"], std=config["std"])

    return preprocess


def lite_source(arch: str) -> Callable[[storage.StorageOptions], dict[str, str]]:
    """The arch's package, its version, the weights file and its sha256."""
    def source(options: storage.StorageOptions) -> dict[str, str]:
        path = package_weights_file(arch)
        package = LITE_VARIANTS[arch].package
        return {"kind": "package", "package": f"{package}=={package_version(package)}", "file": path.name,
                "sha256": read_state_dict(str(path), options)[1]}

    return source


for _lite in LITE_VARIANTS:
    register_architecture(Architecture(
        _lite, lite_builder(_lite), lite_preprocess(_lite), load_lite_weights, lite_fold_batchnorm,
        imagenet_source=lite_source(_lite), pretrained=True, pools_stages=True))

ARCHS = tuple(_REGISTRY)
PRETRAINED_ARCHS = tuple(name for name, arch in _REGISTRY.items() if arch.pretrained)  # pretrained by default


# --- what the rest of the project calls ---------------------------------------------------------------------------

def require_imagenet_weights(spec: Architecture) -> Architecture:
    if not spec.has_imagenet_weights:
        having = ", ".join(name for name, known in _REGISTRY.items() if known.has_imagenet_weights)
        raise WeightsUnavailableError(f"no pretrained weights exist for arch {spec.name!r}; only {having} have them")
    return spec


def default_preprocess(arch: str, width: int | None = None) -> PreprocessSpec:
    """The arch's input size, mean and std: for a pretrained backbone a whole poster (288x432) with its own mean
    and std; the study's square sizes for the others. `width` overrides the arch's."""
    return architecture(arch).preprocess(width)


def build_model(
    *, arch: str, num_genres: int, pretrained: bool = False, weights: str | None = None,
    storage_options: storage.StorageOptions = storage.StorageOptions(), pooled_blocks: tuple[int, ...] | None = None,
) -> GenreNet:
    """A fresh model. `pretrained`: the arch's ImageNet weights (an installed package for the EfficientNet-Lites,
    torchvision's download for resnet50); `weights`: a backbone state_dict file instead (path or s3://).
    `pooled_blocks`: a Lite backbone's stages pooled into its features (default `LITE_POOLED_BLOCKS`; a
    checkpoint passes the ones it was trained with)."""
    spec = architecture(arch)
    if pretrained or weights:
        require_imagenet_weights(spec)
    if pooled_blocks and not spec.pools_stages:
        pooling = ", ".join(name for name, known in _REGISTRY.items() if known.pools_stages)
        raise ValueError(f"pooled_blocks applies to {pooling}, not {arch!r}")
    model = spec.build(num_genres, pretrained and weights is None, pooled_blocks)
    if weights:
        load_backbone_weights(model, arch, weights, storage_options)
    return model


def load_backbone_weights(model: GenreNet, arch: str, uri: str, options: storage.StorageOptions) -> None:
    """Load an ImageNet-style state_dict into the backbone; its classifier (fc.* / _fc.* / classifier.*) is dropped."""
    state, _ = read_state_dict(uri, options)
    architecture(arch).load_weights(model.backbone, state, uri)
    logger.info("loaded backbone weights from %s", uri)


def weights_source(*, arch: str, pretrained: bool, weights: str | None,
                   options: storage.StorageOptions = storage.StorageOptions()) -> dict[str, str]:
    """Where a run's initial weights came from, for its checkpoint: a file and its sha256, a package, or random."""
    if weights:
        return {"kind": "file", "uri": storage.redact(weights), "sha256": read_state_dict(weights, options)[1]}
    if not pretrained:
        return {"kind": "random"}
    return require_imagenet_weights(architecture(arch)).imagenet_source(options)


def fold_batchnorm(model: nn.Module, arch: str) -> nn.Module:
    """For inference: each eval-mode BatchNorm folded into the convolution before it, the same function (to ~1e-5),
    one pass over the activations fewer (see docs/performance.md). Use the returned module."""
    return architecture(arch).fold_batchnorm(model)
