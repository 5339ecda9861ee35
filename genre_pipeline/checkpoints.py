"""Self-describing checkpoints: `model.pt` (a state_dict) + `meta.json` (everything inference needs).

A checkpoint is a directory, local or s3://. Loading uses `torch.load(weights_only=True)`: a checkpoint
from a bucket is data, never code.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from genre_pipeline import storage
from genre_pipeline.images import PreprocessSpec
from genre_pipeline.models import GenreNet, build_model

WEIGHTS_FILE = "model.pt"
META_FILE = "meta.json"


class CheckpointError(RuntimeError):
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
    weights_source: dict[str, str] = field(default_factory=dict)  # the initial weights: package/file + sha256, random
    recipe: dict = field(default_factory=dict)  # the training hyperparameters that made it
    versions: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["preprocess"] = self.preprocess.to_dict()
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMeta:
        data = json.loads(text)
        data["preprocess"] = PreprocessSpec.from_dict(data["preprocess"])
        return cls(**data)

    @property
    def threshold_array(self) -> np.ndarray:
        return np.asarray(self.thresholds, dtype=np.float32)


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


def save_checkpoint(directory: str | Path, model: torch.nn.Module, meta: ModelMeta) -> ModelMeta:
    """Write weights and meta into a local directory; the model version is derived from the weights' hash."""
    data = weights_bytes(model)
    digest = hashlib.sha256(data).hexdigest()[:12]
    meta = ModelMeta(**{**asdict(meta), "preprocess": meta.preprocess,
                        "model_version": f"{meta.arch}-e{meta.epoch}-{digest}"})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / WEIGHTS_FILE).write_bytes(data)
    (directory / META_FILE).write_text(meta.to_json())
    return meta


def read_meta(uri: str, options: storage.StorageOptions = storage.StorageOptions()) -> ModelMeta:
    try:
        return ModelMeta.from_json(storage.read_bytes(storage.join(uri, META_FILE), options).decode())
    except FileNotFoundError:
        raise CheckpointError(f"{uri}: no {META_FILE}; is this a genre_pipeline checkpoint directory?") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{storage.join(uri, META_FILE)}: unreadable checkpoint meta: {error}") from None


def load_checkpoint(
    uri: str, options: storage.StorageOptions = storage.StorageOptions(), map_location: str = "cpu"
) -> tuple[GenreNet, ModelMeta]:
    """Rebuild the model from meta (no pretrained download: the weights replace them) and load the weights."""
    meta = read_meta(uri, options)
    model = build_model(arch=meta.arch, num_genres=len(meta.genres))
    weights_uri = storage.join(uri, WEIGHTS_FILE)
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(weights_uri, options)),
                           map_location=map_location, weights_only=True)
        model.load_state_dict(state)
    except FileNotFoundError:
        raise CheckpointError(f"{weights_uri}: weights file is missing") from None
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{weights_uri}: unreadable weights: {error}") from None
    return model.eval(), meta


def copy_checkpoint(source_dir: str, target_uri: str,
                    options: storage.StorageOptions = storage.StorageOptions()) -> None:
    """Publish a checkpoint to a stable URI (weights first, meta last: meta's presence marks it complete)."""
    for name in (WEIGHTS_FILE, META_FILE):
        storage.write_bytes(storage.join(target_uri, name), (Path(source_dir) / name).read_bytes(), options)
