"""Self-describing checkpoints: `model.pt` (a state_dict) + `meta.json` (everything inference needs).

A checkpoint is a directory, local or s3://. Loading uses `torch.load(weights_only=True)`: a checkpoint
from a bucket is data, never code, and its weights must match the sha256 that meta records.

Publishing never changes a checkpoint in place: it writes `<run>/versions/<model_version>/` (weights, then meta),
then swaps the pointer `<run>/model/pointer.json` to it in one write. A model URI is a checkpoint directory or a
folder holding such a pointer; `pin_model` resolves it once per job.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import platform
import posixpath
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from genre_pipeline.data import storage
from genre_pipeline.data.images import PreprocessSpec
from genre_pipeline.errors import JobInputError
from genre_pipeline.model.architectures import GenreNet, build_model
from genre_pipeline.model.fusion import POSTER, FusionHead, FusionNet

WEIGHTS_FILE = "model.pt"
META_FILE = "meta.json"
POINTER_FILE = "pointer.json"  # in a published model folder: which version it currently means
VERSIONS_DIR = "versions"


class CheckpointError(JobInputError, RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable; the message names the URI."""


@dataclass(frozen=True)
class ModelMeta:
    arch: str
    genres: list[str]
    preprocess: PreprocessSpec
    thresholds: list[float]  # per genre, tuned on validation; applied by the label job
    threshold_objective: str = "macro"  # the F1 the thresholds maximise (checkpoints before the choice: macro)
    epoch: int = 0  # full-network epochs completed when this checkpoint was taken (0: the head phase's)
    metrics: dict[str, float] = field(default_factory=dict)  # validation metrics at that epoch
    data_fingerprint: str = ""  # which training rows made it: hash of the sorted train/val movie_ids
    model_version: str = ""  # stable id written into every label row
    weights_sha256: str = ""  # of model.pt; checked on every load (before: the 12 hex digits in model_version)
    weights_source: dict[str, str] = field(default_factory=dict)  # the initial weights: package/file + sha256, random
    recipe: dict = field(default_factory=dict)  # the training hyperparameters that made it
    versions: dict[str, str] = field(default_factory=dict)
    signals: list[str] = field(default_factory=lambda: ["poster"])  # what the model scores from
    # A Lite backbone's stages pooled beside its last convolution (empty: that alone, as before they were).
    pooled_blocks: list[int] = field(default_factory=list)
    # A fusion model's: hidden width, each signal's input width, the embedding tables it was trained on (uri,
    # version, space), thresholds per signal subset and validation metrics per subset. Empty: a poster model.
    fusion: dict = field(default_factory=dict)

    @property
    def is_fusion(self) -> bool:
        return bool(self.fusion)

    def thresholds_for(self, subset: str) -> np.ndarray:
        """The thresholds tuned for this subset of signals (a poster model: its only ones)."""
        by_subset = self.fusion.get("thresholds_by_signals", {})
        return np.asarray(by_subset.get(subset, self.thresholds), dtype=np.float32)

    def to_json(self) -> str:
        data = asdict(self)
        data["preprocess"] = self.preprocess.to_dict()
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMeta:
        data = json.loads(text)
        data["preprocess"] = PreprocessSpec.from_dict(data["preprocess"])
        return cls(**data)


def runtime_versions() -> dict[str, str]:
    import ray
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "ray": ray.__version__}


def weights_bytes(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    # Unwrap DDP so keys have no "module." prefix and the weights load into a plain model.
    state = getattr(model, "module", model).state_dict()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buffer)
    return buffer.getvalue()


def model_family(meta: ModelMeta) -> str:
    return f"fusion-{meta.arch}" if meta.is_fusion else meta.arch


def build_from_meta(meta: ModelMeta) -> torch.nn.Module:
    """The network meta describes, with untrained weights (the checkpoint's replace them)."""
    model = build_model(arch=meta.arch, num_genres=len(meta.genres), pooled_blocks=tuple(meta.pooled_blocks))
    if not meta.is_fusion:
        return model
    backbone = model.backbone if POSTER in meta.signals else None
    dims = {signal: int(width) for signal, width in meta.fusion["dims"].items()}
    return FusionNet(backbone, FusionHead(dims, int(meta.fusion["hidden"]), len(meta.genres)))


def pooled_blocks_of(model: torch.nn.Module) -> list[int]:
    """The stages a model's Lite backbone pools (none for other backbones), read off the model itself."""
    backbone = getattr(getattr(model, "module", model), "backbone", None)
    return list(getattr(backbone, "pooled_blocks", ()))


def save_checkpoint(directory: str | Path, model: torch.nn.Module, meta: ModelMeta) -> ModelMeta:
    """Write weights and meta into a local directory; the model version is derived from the weights' hash, and
    the meta's `pooled_blocks` from the model (so that the meta always rebuilds the network the weights fit)."""
    data = weights_bytes(model)
    digest = hashlib.sha256(data).hexdigest()
    meta = ModelMeta(**{**asdict(meta), "preprocess": meta.preprocess, "weights_sha256": digest,
                        "pooled_blocks": pooled_blocks_of(model),
                        "model_version": f"{model_family(meta)}-e{meta.epoch}-{digest[:12]}"})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / WEIGHTS_FILE).write_bytes(data)
    (directory / META_FILE).write_text(meta.to_json())
    return meta


def read_meta(uri: str, options: storage.StorageOptions = storage.StorageOptions()) -> ModelMeta:
    """The meta of a checkpoint directory, or of the version a model folder's pointer names."""
    uri = resolve_checkpoint(uri, options)
    try:
        return ModelMeta.from_json(storage.read_bytes(storage.join(uri, META_FILE), options).decode())
    except FileNotFoundError:
        raise CheckpointError(f"{uri}: no {META_FILE}; is this a genre_pipeline checkpoint directory?") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{storage.join(uri, META_FILE)}: unreadable checkpoint meta: {error}") from None


def resolve_checkpoint(uri: str, options: storage.StorageOptions = storage.StorageOptions()) -> str:
    """`uri` itself, or the checkpoint directory its pointer file names."""
    pointer_uri = storage.join(uri, POINTER_FILE)
    try:
        pointer = json.loads(storage.read_bytes(pointer_uri, options))
        target = pointer["checkpoint"]
    except FileNotFoundError:
        return uri
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{pointer_uri}: unreadable model pointer: {error}") from None
    return target if storage.is_remote(target) or os.path.isabs(target) else storage.relative_to(uri, target)


def verify_weights(data: bytes, meta: ModelMeta, weights_uri: str) -> str:
    """The weights' sha256, once it matches the one meta records; else CheckpointError."""
    digest = hashlib.sha256(data).hexdigest()
    expected = meta.weights_sha256 or meta.model_version.rsplit("-", 1)[-1]
    if not digest.startswith(expected):
        raise CheckpointError(f"{weights_uri}: sha256 {digest[:12]}... does not match {expected[:12]}... recorded "
                              f"for {meta.model_version}: the weights were changed after publishing; refusing them")
    return digest


@dataclass(frozen=True)
class PinnedModel:
    """The exact model a job uses, resolved once: every actor loads this directory and checks this digest."""

    uri: str  # a checkpoint directory (a pointer already followed)
    meta: ModelMeta
    weights_sha256: str


def pin_model(uri: str, options: storage.StorageOptions = storage.StorageOptions()) -> PinnedModel:
    directory = resolve_checkpoint(uri, options)
    meta = read_meta(directory, options)
    weights_uri = storage.join(directory, WEIGHTS_FILE)
    digest = verify_weights(_read_weights(weights_uri, options), meta, weights_uri)
    return PinnedModel(directory, meta, digest)


def _read_weights(weights_uri: str, options: storage.StorageOptions) -> bytes:
    try:
        return storage.read_bytes(weights_uri, options)
    except FileNotFoundError:
        raise CheckpointError(f"{weights_uri}: weights file is missing") from None
    except OSError as error:
        raise CheckpointError(f"{weights_uri}: unreadable weights: {error}") from None


def load_checkpoint(
    uri: str, options: storage.StorageOptions = storage.StorageOptions(), map_location: str = "cpu",
    expected_sha256: str | None = None,
) -> tuple[GenreNet | FusionNet, ModelMeta]:
    """Rebuild the model from meta (no pretrained download: the weights replace them) and load the weights,
    once their digest matches meta's (and `expected_sha256`, a pinned model's)."""
    uri = resolve_checkpoint(uri, options)
    meta = read_meta(uri, options)
    weights_uri = storage.join(uri, WEIGHTS_FILE)
    data = _read_weights(weights_uri, options)
    digest = verify_weights(data, meta, weights_uri)
    if expected_sha256 and digest != expected_sha256:
        raise CheckpointError(f"{weights_uri}: sha256 {digest[:12]}... is not the pinned {expected_sha256[:12]}...: "
                              "the model changed during the run; refusing it")
    model = build_from_meta(meta)
    try:
        model.load_state_dict(torch.load(io.BytesIO(data), map_location=map_location, weights_only=True))
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{weights_uri}: unreadable weights: {error}") from None
    return model.eval(), meta


def publish_checkpoint(source_dir: str, model_uri: str,
                       options: storage.StorageOptions = storage.StorageOptions()) -> str:
    """Publish a local checkpoint under `model_uri` (e.g. <storage>/<run>/model): a new immutable
    `../versions/<model_version>/`, then the pointer. Returns the version's URI."""
    meta = ModelMeta.from_json((Path(source_dir) / META_FILE).read_text())
    relative = posixpath.join("..", VERSIONS_DIR, meta.model_version)
    version_uri = storage.relative_to(model_uri, relative)
    for name in (WEIGHTS_FILE, META_FILE):  # meta last: its presence marks the version complete
        storage.write_bytes(storage.join(version_uri, name), (Path(source_dir) / name).read_bytes(), options)
    pointer = json.dumps({"checkpoint": relative, "model_version": meta.model_version,
                          "weights_sha256": meta.weights_sha256}, indent=2).encode()
    storage.write_atomically(storage.join(model_uri, POINTER_FILE), pointer, options)
    for name in (WEIGHTS_FILE, META_FILE):  # a checkpoint published in place before pointers existed
        legacy = storage.join(model_uri, name)
        if storage.exists(legacy, options):
            storage.remove(legacy, options)
    return version_uri
