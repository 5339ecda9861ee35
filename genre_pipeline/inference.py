"""`GenrePredictor`: the callable class the label job's actor pool runs (one model load per actor)."""

from __future__ import annotations

import logging
import os
import time
import warnings

import numpy as np
import torch

from genre_pipeline import storage, telemetry
from genre_pipeline.checkpoints import load_checkpoint
from genre_pipeline.images import to_model_input
from genre_pipeline.labels import STATUS_OK

logger = logging.getLogger(__name__)


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def actor_cpu_count() -> int:
    """CPUs Ray assigned to this actor; intra-op threads beyond that would fight the other actors."""
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            return max(1, int(cpus))
    except Exception:  # outside Ray (unit tests, benchmarks)
        pass
    return os.cpu_count() or 1


class GenrePredictor:
    """Loads the checkpoint once; each call scores the `ok` rows of a batch and drops the image column."""

    def __init__(self, checkpoint_uri: str, *, storage_options: storage.StorageOptions = storage.StorageOptions(),
                 device: str = "auto", num_threads: int | None = None) -> None:
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            torch.set_num_threads(num_threads or actor_cpu_count())
        model, self.meta = load_checkpoint(checkpoint_uri, storage_options)
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.spec = self.meta.preprocess
        logger.info("GenrePredictor loaded %s on %s", self.meta.model_version, self.device)

    @torch.inference_mode()
    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 N×S×S×3 -> sigmoid scores N×G (float32)."""
        with warnings.catch_warnings():
            # Ray Data hands zero-copy, read-only arrays; the model only reads them (to_model_input makes the
            # float copy), so torch's "not writable" warning on every batch is noise.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            batch = torch.from_numpy(images)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            logits = self.model(to_model_input(batch, self.spec))
        return torch.sigmoid(logits.float()).cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("image")
        ok = batch["status"] == STATUS_OK
        scores = np.full((len(images), len(self.meta.genres)), np.nan, dtype=np.float32)
        if ok.any():
            started = time.perf_counter()
            scores[ok] = self.predict(images[ok] if not ok.all() else images)
            telemetry.observe_predict_batch(time.perf_counter() - started, self.device.type)
        batch["scores"] = scores
        return batch
