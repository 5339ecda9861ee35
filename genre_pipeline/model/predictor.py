"""`GenrePredictor`: the callable class the label job's actor pool runs (one model load per actor)."""

from __future__ import annotations

import ctypes
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.fx.experimental.optimization import fuse

from genre_pipeline import telemetry
from genre_pipeline.data import storage
from genre_pipeline.data.tensors import to_model_input
from genre_pipeline.model.backbones import LITE_VARIANTS, fold_lite_batch_norms
from genre_pipeline.model.checkpoints import ModelMeta, PinnedModel, load_checkpoint, load_pinned
from genre_pipeline.model.signals import POSTER
from genre_pipeline.runtime import KEEP_FREED_BYTES
from genre_pipeline.signals.join import embedding_column, signal_matrix
from genre_pipeline.statuses import STATUS_NO_SIGNALS, STATUS_OK, STATUS_PARTIAL

logger = logging.getLogger(__name__)


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def actor_cpu_count() -> int:
    """CPUs Ray assigned to this actor (rounded up), else the machine's: more threads would fight other actors."""
    import ray

    # Outside Ray (tests, benchmarks, gpu_check) asking for the runtime context would start a Ray instance, and
    # a driver (a notebook after ray.init()) has no task and no assigned resources to ask for.
    if ray.is_initialized() and ray.get_runtime_context().get_task_id() is not None:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            return max(1, math.ceil(cpus - 1e-6))
    return os.cpu_count() or 1


PRECISIONS = ("auto", "fp32", "bf16")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast: the default on GPUs; on CPUs an option, faster on AVX512-BF16 cores (docs/performance.md),
    that moves scores slightly: label a night with each precision and compare their `evaluate.py` reports."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def reuse_freed_memory() -> None:
    """In this process's main thread, keep freed activation buffers for the next batch (glibc).

    The in-process counterpart of `runtime.TORCH_WORKER_ENV`, which Ray workers get at start-up: scoring in a
    plain process (benchmarks, gpu_check, a notebook) then pays no page faults per batch either.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return
    libc.mallopt(M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
    libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES)


def fold_batch_norms(model: torch.nn.Module, arch: str) -> torch.nn.Module:
    """Fold each eval-mode BatchNorm into the convolution before it: the same function (to ~1e-5), one pass
    over the activations fewer (see docs/performance.md)."""
    if arch in LITE_VARIANTS:
        fold_lite_batch_norms(model.backbone)
        return model
    try:
        return fuse(model)
    except Exception as error:  # a model torch.fx cannot trace still scores, only unfused
        logger.warning("scoring without folded batch norms: %s", error)
        return model


def chunks(rows: np.ndarray, size: int | None) -> list[np.ndarray]:
    step = size or max(1, len(rows))
    return [rows[start:start + step] for start in range(0, len(rows), step)]


def signal_lists(rows: list[list[str]]) -> np.ndarray:
    array = np.empty(len(rows), dtype=object)
    array[:] = rows
    return array


@dataclass(frozen=True)
class FusedInputs:
    """A batch's signals for a fusion model: `mask` (rows, signals in the model's order), the embeddings."""

    signals: list[str]
    mask: np.ndarray
    embeddings: dict[str, np.ndarray]

    def used(self) -> list[list[str]]:
        return [[s for s, present in zip(self.signals, row, strict=True) if present] for row in self.mask > 0]


def fused_inputs(batch: dict[str, np.ndarray], meta: ModelMeta) -> FusedInputs:
    count = len(batch["status"])
    present, embeddings = {}, {}
    for signal in meta.signals:
        if signal == POSTER:
            present[signal] = batch["status"] == STATUS_OK
        else:
            embeddings[signal], present[signal] = signal_matrix(batch.get(embedding_column(signal)), count,
                                                                int(meta.fusion["dims"][signal]))
    mask = np.stack([present[s] for s in meta.signals], axis=1).astype(np.float32)
    return FusedInputs(list(meta.signals), mask, embeddings)


def fused_status(batch: dict[str, np.ndarray], inputs: FusedInputs) -> tuple[np.ndarray, np.ndarray]:
    """`ok` with every signal; `partial_signals` with some, the error naming what was missing; with none, the
    poster's status, its error saying the other signals were missing too."""
    status, error = batch["status"].copy(), batch["error"].copy()
    for row, used in enumerate(inputs.used()):
        missing = [missing_reason(signal, status[row], error[row]) for signal in inputs.signals if signal not in used]
        if not missing:
            continue
        if used:
            status[row] = STATUS_PARTIAL
        elif status[row] == STATUS_OK:  # a model without the poster signal, and no embedding for this movie
            status[row] = STATUS_NO_SIGNALS
        error[row] = "; ".join(missing)
    return status, error


def missing_reason(signal: str, poster_status: str, poster_error: str | None) -> str:
    if signal == POSTER:
        return f"poster {poster_status}" + (f": {poster_error}" if isinstance(poster_error, str) else "")
    return f"no {signal} embedding"


def is_run(rows: np.ndarray) -> bool:
    """Consecutive row numbers: a slice of the images is a view, not a copy."""
    return len(rows) > 0 and rows[-1] - rows[0] == len(rows) - 1


class GenrePredictor:
    """Loads the checkpoint once; each call scores the `ok` rows of a batch and drops the image column.

    `checkpoint` is a job's `PinnedModel` (exactly those bytes, or an error) or a URI (what it means now).
    """

    def __init__(self, checkpoint: str | PinnedModel, *,
                 storage_options: storage.StorageOptions = storage.StorageOptions(), device: str = "auto",
                 num_threads: int | None = None, precision: str = "auto", compile_model: bool = False) -> None:
        self.device = resolve_device(device)
        self.threads = num_threads or actor_cpu_count()
        self._use_threads()
        if self.device.type == "cpu":
            reuse_freed_memory()
        self.autocast_dtype = autocast_dtype(precision, self.device)
        if isinstance(checkpoint, PinnedModel):
            model, self.meta = load_pinned(checkpoint, storage_options)
        else:
            model, self.meta = load_checkpoint(checkpoint, storage_options)
        self.model = fold_batch_norms(model.eval(), self.meta.arch).to(self.device, memory_format=torch.channels_last)
        if compile_model:  # minutes of compilation per actor: worth it only for long runs on GPUs
            self.model = torch.compile(self.model)
        self.spec = self.meta.preprocess
        logger.info("GenrePredictor loaded %s on %s (%s, %d threads)", self.meta.model_version, self.device,
                    self.autocast_dtype or torch.float32, self.threads)

    def _use_threads(self) -> None:
        """Intra-op threads and denormal flushing are per calling thread with OpenMP, and Ray Data calls the
        actor from another thread than the one that built it (where Ray's OMP_NUM_THREADS=1 applies): set
        both on the calling thread, every call (it costs microseconds)."""
        if self.device.type == "cpu":
            if torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)
            # Arithmetic on denormal floats is many times slower on x86; flushing them to zero changes no
            # score by more than 1e-30. (A safeguard: the benchmark models showed no denormal slowdown.)
            torch.set_flush_denormal(True)

    @torch.inference_mode()
    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 N×S×S×3 -> sigmoid scores N×G (float32)."""
        self._use_threads()
        with warnings.catch_warnings():
            # Ray Data hands zero-copy, read-only arrays; the model only reads them (to_model_input makes the
            # float copy), so torch's "not writable" warning on every batch is noise.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            batch = torch.from_numpy(images)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits = self.model(to_model_input(batch, self.spec))
        return torch.sigmoid(logits.float()).cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray], *, forward_batch: int | None = None) -> dict[str, np.ndarray]:
        """Scores the rows it can, `forward_batch` rows per forward pass (default: all at once); adds `scores`
        (NaN where not scored) and `signals` (what scored each row)."""
        if self.meta.is_fusion:
            return self.score_fused(batch, forward_batch)
        images = batch.pop("image")
        ok = np.flatnonzero(batch["status"] == STATUS_OK)
        scores = np.full((len(images), len(self.meta.genres)), np.nan, dtype=np.float32)
        for rows in chunks(ok, forward_batch):
            started = time.perf_counter()
            scores[rows] = self.predict(images[rows[0]:rows[-1] + 1] if is_run(rows) else images[rows])
            telemetry.observe_predict_batch(time.perf_counter() - started, self.device.type)
        batch["scores"] = scores
        batch["signals"] = signal_lists([[POSTER] if row_ok else [] for row_ok in batch["status"] == STATUS_OK])
        return batch

    def score_fused(self, batch: dict[str, np.ndarray], forward_batch: int | None) -> dict[str, np.ndarray]:
        """A fusion model: each row scored with the signals it has (a poster that decoded, a row in each
        embedding table); rows with none keep their poster status."""
        images = batch.pop("image", None)
        inputs = fused_inputs(batch, self.meta)
        count = len(batch["status"])
        scores = np.full((count, len(self.meta.genres)), np.nan, dtype=np.float32)
        for rows in chunks(np.flatnonzero(inputs.mask.any(axis=1)), forward_batch):
            started = time.perf_counter()
            scores[rows] = self.predict_fused(None if images is None else images[rows], inputs, rows)
            telemetry.observe_predict_batch(time.perf_counter() - started, self.device.type)
        batch["scores"] = scores
        batch["signals"] = signal_lists(inputs.used())
        batch["status"], batch["error"] = fused_status(batch, inputs)
        return batch

    @torch.inference_mode()
    def predict_fused(self, images: np.ndarray | None, inputs: FusedInputs, rows: np.ndarray) -> np.ndarray:
        self._use_threads()
        mask = torch.from_numpy(inputs.mask[rows]).to(self.device)
        embeddings = {s: torch.from_numpy(e[rows]).to(self.device) for s, e in inputs.embeddings.items()}
        model_input = None
        if images is not None and POSTER in self.meta.signals:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                model_input = to_model_input(torch.from_numpy(images).to(self.device), self.spec)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits = self.model(model_input, embeddings, mask)
        return torch.sigmoid(logits.float()).cpu().numpy()
