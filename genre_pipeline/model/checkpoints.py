"""Self-describing checkpoints: `model.pt` (a state_dict) + `meta.json` (everything inference needs).

A checkpoint is a directory, local or s3://. Loading uses `torch.load(weights_only=True)`: a checkpoint
from a bucket is data, never code, and its weights must match the full sha256 that meta records.

Publishing never changes a checkpoint in place: it writes `<run>/versions/<model_version>/` (weights, then meta),
then swaps the pointer `<run>/model/pointer.json` to it in one write; the pointer records the version's weights
digest too. A model URI is a checkpoint directory or a folder holding such a pointer. `pin_model` resolves it
once per job and records the digests of its weights and meta; every actor then loads it with `load_pinned`,
which refuses bytes that differ from the pinned ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import platform
import posixpath
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from genre_pipeline.data import storage
from genre_pipeline.data.images import PreprocessSpec
from genre_pipeline.errors import JobInputError
from genre_pipeline.model.architectures import GenreNet, build_model
from genre_pipeline.model.fusion import FusionHead, FusionNet, FusionSpec
from genre_pipeline.model.signals import POSTER

WEIGHTS_FILE = "model.pt"
META_FILE = "meta.json"
POINTER_FILE = "pointer.json"  # in a published model folder: which version it currently means
VERSIONS_DIR = "versions"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
LEGACY_DIGEST = re.compile(r"[0-9a-f]{12}")  # what model_version carries: all a checkpoint had before weights_sha256


class CheckpointError(JobInputError, RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable; the message names the URI."""


class DigestError(CheckpointError):
    """A weights or meta digest that is missing, malformed, or not the one recorded or pinned; names the URI."""


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
    # A fusion model's `FusionSpec` as its JSON object (`fusion_spec` reads it typed; the stored form stays the
    # object, so that the meta, its digests and the readers of older checkpoints are unchanged). Empty: a poster model.
    fusion: dict = field(default_factory=dict)

    @property
    def fusion_spec(self) -> FusionSpec | None:
        """The fusion model's spec; None for a poster model."""
        return FusionSpec.from_dict(self.fusion)

    @property
    def is_fusion(self) -> bool:
        return bool(self.fusion)

    def thresholds_for(self, subset: str) -> np.ndarray:
        """The thresholds tuned for this subset of signals (a poster model: its only ones)."""
        spec = self.fusion_spec
        by_subset = spec.thresholds_by_signals if spec else {}
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
    spec = meta.fusion_spec
    backbone = model.backbone if POSTER in meta.signals else None
    dims = {signal: int(width) for signal, width in spec.dims.items()}
    return FusionNet(backbone, FusionHead(dims, int(spec.hidden), len(meta.genres)))


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
    directory = resolve_checkpoint(uri, options)
    return parse_meta(_read_meta_bytes(directory, options), storage.join(directory, META_FILE))


def parse_meta(data: bytes, meta_uri: str) -> ModelMeta:
    try:
        return ModelMeta.from_json(data.decode())
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{meta_uri}: unreadable checkpoint meta: {error}") from None


def _read_meta_bytes(directory: str, options: storage.StorageOptions) -> bytes:
    meta_uri = storage.join(directory, META_FILE)
    try:
        return storage.read_bytes(meta_uri, options)
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {META_FILE}; is this a genre_pipeline checkpoint directory?") from None
    except OSError as error:
        raise CheckpointError(f"{meta_uri}: unreadable checkpoint meta: {error}") from None


@dataclass(frozen=True)
class ModelPointer:
    """A published model folder's pointer.json: the version it means now, and that version's weights digest."""

    uri: str  # of pointer.json itself
    checkpoint: str  # the version directory it names, resolved against the folder
    model_version: str
    weights_sha256: object  # as written; checked by pin_model


def read_pointer(uri: str, options: storage.StorageOptions = storage.StorageOptions()) -> ModelPointer | None:
    """The pointer of the model folder `uri`; None when `uri` has none (a checkpoint directory)."""
    pointer_uri = storage.join(uri, POINTER_FILE)
    try:
        pointer = json.loads(storage.read_bytes(pointer_uri, options))
        target, version, digest = str(pointer["checkpoint"]), pointer.get("model_version", ""), pointer.get(
            "weights_sha256")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{pointer_uri}: unreadable model pointer: {error}") from None
    directory = target if storage.is_remote(target) or os.path.isabs(target) else storage.relative_to(uri, target)
    return ModelPointer(pointer_uri, directory, str(version), digest)


def resolve_checkpoint(uri: str, options: storage.StorageOptions = storage.StorageOptions()) -> str:
    """`uri` itself, or the checkpoint directory its pointer file names."""
    pointer = read_pointer(uri, options)
    return uri if pointer is None else pointer.checkpoint


def checked_digest(value: object, where: str) -> str:
    """`value` when it is a full sha256 (64 lowercase hex characters), else DigestError naming `where`."""
    if isinstance(value, str) and SHA256_HEX.fullmatch(value):
        return value
    raise DigestError(f"{where}: weights sha256 {value!r} is not a sha256 (64 lowercase hex characters): "
                      "nothing to pin the weights to; refusing the model")


def recorded_digest(meta: ModelMeta, meta_uri: str) -> str:
    """The full weights sha256 meta records. A checkpoint from before the field has only the 12 hex digits in its
    model_version: too few to pin weights to (a match is cheap to forge), so it must be re-published."""
    if not meta.weights_sha256 and LEGACY_DIGEST.fullmatch(meta.model_version.rsplit("-", 1)[-1]):
        raise DigestError(f"{meta_uri}: records no full weights sha256, only the 12 hex digits in model_version "
                          f"{meta.model_version!r}, too few to pin the weights to: re-publish the checkpoint "
                          "(publish_checkpoint records the full sha256 once the weights match those digits)")
    return checked_digest(meta.weights_sha256, meta_uri)


def check_pointer(pointer: ModelPointer, meta: ModelMeta, digest: str) -> None:
    """A pointer must name the version it points at: its digest and model version are the version's own."""
    named = checked_digest(pointer.weights_sha256, pointer.uri)
    if named != digest or (pointer.model_version and pointer.model_version != meta.model_version):
        raise DigestError(
            f"{pointer.uri}: names {pointer.model_version or 'a version'} with weights sha256 {named[:12]}..., but "
            f"{storage.join(pointer.checkpoint, META_FILE)} records {meta.model_version} with {digest[:12]}...: "
            "the pointer and the version disagree; refusing them")


def check_weights(data: bytes, expected: str, weights_uri: str, why: str) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise DigestError(f"{weights_uri}: sha256 {digest[:12]}... does not match {expected[:12]}... {why}; "
                          "refusing them")


@dataclass(frozen=True)
class PinnedModel:
    """The exact model a job uses, resolved once: every actor loads this directory and checks both digests."""

    uri: str  # a checkpoint directory (a pointer already followed)
    meta: ModelMeta
    weights_sha256: str
    meta_sha256: str  # of meta.json's bytes: the thresholds every actor applies are the ones pinned


def pin_model(uri: str, options: storage.StorageOptions = storage.StorageOptions()) -> PinnedModel:
    """Resolve `uri` once and check it: a full weights sha256 in the meta (and the pointer's, the same), and
    weights that hash to it. CheckpointError (a job's exit 2) otherwise."""
    return _pin(uri, options)[0]


def _pin(uri: str, options: storage.StorageOptions) -> tuple[PinnedModel, bytes]:
    """The pinned model and its verified weights' bytes."""
    pointer = read_pointer(uri, options)
    directory = uri if pointer is None else pointer.checkpoint
    meta_uri, weights_uri = storage.join(directory, META_FILE), storage.join(directory, WEIGHTS_FILE)
    meta_bytes = _read_meta_bytes(directory, options)
    meta = parse_meta(meta_bytes, meta_uri)
    digest = recorded_digest(meta, meta_uri)
    if pointer is not None:
        check_pointer(pointer, meta, digest)
    data = _read_weights(weights_uri, options)
    check_weights(data, digest, weights_uri,
                  f"recorded for {meta.model_version}: the weights were changed after publishing")
    return PinnedModel(directory, meta, digest, hashlib.sha256(meta_bytes).hexdigest()), data


def _read_weights(weights_uri: str, options: storage.StorageOptions) -> bytes:
    try:
        return storage.read_bytes(weights_uri, options)
    except FileNotFoundError:
        raise CheckpointError(f"{weights_uri}: weights file is missing") from None
    except OSError as error:
        raise CheckpointError(f"{weights_uri}: unreadable weights: {error}") from None


def _build(meta: ModelMeta, data: bytes, weights_uri: str, map_location: str) -> GenreNet | FusionNet:
    """Rebuild the model from meta (no pretrained download: the weights replace them) and load the weights."""
    model = build_from_meta(meta)
    try:
        model.load_state_dict(torch.load(io.BytesIO(data), map_location=map_location, weights_only=True))
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{weights_uri}: unreadable weights: {error}") from None
    return model.eval()


def load_checkpoint(
    uri: str, options: storage.StorageOptions = storage.StorageOptions(), map_location: str = "cpu",
) -> tuple[GenreNet | FusionNet, ModelMeta]:
    """The model `uri` means now, checked as `pin_model` checks it."""
    pinned, data = _pin(uri, options)
    return _build(pinned.meta, data, storage.join(pinned.uri, WEIGHTS_FILE), map_location), pinned.meta


def load_pinned(
    pinned: PinnedModel, options: storage.StorageOptions = storage.StorageOptions(), map_location: str = "cpu",
) -> tuple[GenreNet | FusionNet, ModelMeta]:
    """Exactly the pinned model: meta.json and the weights are read again and must hash to the pinned digests,
    so that a checkpoint changed after the job pinned it (weights or thresholds) is refused, not half-used."""
    meta_uri, weights_uri = storage.join(pinned.uri, META_FILE), storage.join(pinned.uri, WEIGHTS_FILE)
    meta_bytes = _read_meta_bytes(pinned.uri, options)
    meta_digest = hashlib.sha256(meta_bytes).hexdigest()
    if meta_digest != pinned.meta_sha256:
        raise DigestError(f"{meta_uri}: sha256 {meta_digest[:12]}... does not match the pinned "
                          f"{pinned.meta_sha256[:12]}...: the meta (thresholds, genres, preprocessing) changed "
                          "after the job pinned it; refusing it")
    data = _read_weights(weights_uri, options)
    check_weights(data, pinned.weights_sha256, weights_uri, "pinned by this job: the model changed during the run")
    meta = parse_meta(meta_bytes, meta_uri)
    return _build(meta, data, weights_uri, map_location), meta


def with_full_digest(meta: ModelMeta, weights: bytes, meta_uri: str) -> ModelMeta:
    """A meta from before `weights_sha256` existed, given it: only once its weights match the 12 hex digits its
    model_version names (the operator re-publishing it vouches for the rest)."""
    digest = hashlib.sha256(weights).hexdigest()
    named = meta.model_version.rsplit("-", 1)[-1]
    if not (LEGACY_DIGEST.fullmatch(named) and digest.startswith(named)):
        raise DigestError(f"{meta_uri}: records no weights sha256, and model_version {meta.model_version!r} does "
                          f"not name these weights ({digest[:12]}...); refusing to publish them")
    return replace(meta, weights_sha256=digest)


def publish_checkpoint(source_dir: str, model_uri: str,
                       options: storage.StorageOptions = storage.StorageOptions()) -> str:
    """Publish a local checkpoint under `model_uri` (e.g. <storage>/<run>/model): a new immutable
    `../versions/<model_version>/`, then the pointer. Returns the version's URI. The weights must match the
    meta's digest; a meta from before the digest was recorded gets it (see `with_full_digest`)."""
    source = Path(source_dir)
    weights, meta_bytes = (source / WEIGHTS_FILE).read_bytes(), (source / META_FILE).read_bytes()
    meta = parse_meta(meta_bytes, str(source / META_FILE))
    if not meta.weights_sha256:
        meta = with_full_digest(meta, weights, str(source / META_FILE))
        meta_bytes = meta.to_json().encode()
    check_weights(weights, recorded_digest(meta, str(source / META_FILE)), str(source / WEIGHTS_FILE),
                  f"recorded for {meta.model_version}")
    relative = posixpath.join("..", VERSIONS_DIR, meta.model_version)
    version_uri = storage.relative_to(model_uri, relative)
    for name, data in ((WEIGHTS_FILE, weights), (META_FILE, meta_bytes)):  # meta last: it marks the version whole
        storage.write_bytes(storage.join(version_uri, name), data, options)
    write_pointer(model_uri, relative, meta, options)
    for name in (WEIGHTS_FILE, META_FILE):  # a checkpoint published in place before pointers existed
        legacy = storage.join(model_uri, name)
        if storage.exists(legacy, options):
            storage.remove(legacy, options)
    return version_uri


def write_pointer(model_uri: str, checkpoint: str, meta: ModelMeta,
                  options: storage.StorageOptions = storage.StorageOptions()) -> str:
    """Point the model folder `model_uri` at `checkpoint` (relative to it, or absolute) in one atomic write of
    its pointer.json, which records the version's digest. Returns the pointer's URI."""
    pointer_uri = storage.join(model_uri, POINTER_FILE)
    pointer = {"checkpoint": checkpoint, "model_version": meta.model_version,
               "weights_sha256": checked_digest(meta.weights_sha256, pointer_uri)}
    storage.write_atomically(pointer_uri, json.dumps(pointer, indent=2).encode(), options)
    return pointer_uri
