"""The label job's scoring: `load_predictor` loads a checkpoint once per actor and returns the predictor its meta
calls for, a `PosterPredictor` or a `FusionPredictor` (both `GenrePredictor`s, the callable the actor pool runs)."""

from __future__ import annotations

import ctypes
import logging
import math
import os
import time
import warnings

import numpy as np
import torch

from genre_pipeline import telemetry
from genre_pipeline.data import storage
from genre_pipeline.data.tensors import to_model_input
from genre_pipeline.model.architectures import fold_batchnorm
from genre_pipeline.model.checkpoints import ModelMeta, PinnedModel, load_checkpoint, load_pinned
from genre_pipeline.model.fusion import FusionInputs, fusion_inputs
from genre_pipeline.model.signals import POSTER
from genre_pipeline.runtime import KEEP_FREED_BYTES
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


def chunks(rows: np.ndarray, size: int | None) -> list[np.ndarray]:
    step = size or max(1, len(rows))
    return [rows[start:start + step] for start in range(0, len(rows), step)]


def signal_lists(rows: list[list[str]]) -> np.ndarray:
    array = np.empty(len(rows), dtype=object)
    array[:] = rows
    return array


def fusion_status(batch: dict[str, np.ndarray], inputs: FusionInputs) -> tuple[np.ndarray, np.ndarray]:
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
    """What the label job's actors call: loaded once (see `load_predictor`, which picks the class from the
    checkpoint's meta); each call scores the rows of a batch it can, drops the image column, and adds `scores` (NaN
    where not scored) and `signals` (what scored each row). `PosterPredictor` and `FusionPredictor` are the two."""

    def __init__(self, model: torch.nn.Module, meta: ModelMeta, *, device: torch.device, threads: int,
                 autocast_dtype: torch.dtype | None, compile_model: bool = False) -> None:
        self.device, self.threads, self.autocast_dtype, self.meta = device, threads, autocast_dtype, meta
        folded = fold_batchnorm(model.eval(), meta.arch)
        self.model = folded.to(self.device, memory_format=torch.channels_last)
        if compile_model:  # minutes of compilation per actor: worth it only for long runs on GPUs
            self.model = torch.compile(self.model)
        self.spec = meta.preprocess
        logger.info("%s loaded %s on %s (%s, %d threads)", type(self).__name__, meta.model_version, self.device,
                    self.autocast_dtype or torch.float32, self.threads)

    def use_threads(self) -> None:
        use_threads(self.device, self.threads)

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            # Ray Data hands zero-copy, read-only arrays; the model only reads them (to_model_input makes the
            # float copy), so torch's "not writable" warning on every batch is noise.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(images)

    def __call__(self, batch: dict[str, np.ndarray], *, forward_batch: int | None = None) -> dict[str, np.ndarray]:
        raise NotImplementedError


def use_threads(device: torch.device, threads: int) -> None:
    """Intra-op threads and denormal flushing are per calling thread with OpenMP, and Ray Data calls the actor
    from another thread than the one that built it (where Ray's OMP_NUM_THREADS=1 applies): set both on the
    calling thread, every call (it costs microseconds)."""
    if device.type == "cpu":
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        # Arithmetic on denormal floats is many times slower on x86; flushing them to zero changes no
        # score by more than 1e-30. (A safeguard: the benchmark models showed no denormal slowdown.)
        torch.set_flush_denormal(True)


class PosterPredictor(GenrePredictor):
    """A poster model: scores the rows whose poster decoded (`ok`)."""

    @torch.inference_mode()
    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 N×S×S×3 -> sigmoid scores N×G (float32)."""
        self.use_threads()
        batch = self.model_input(images)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits = self.model(to_model_input(batch, self.spec))
        return torch.sigmoid(logits.float()).cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray], *, forward_batch: int | None = None) -> dict[str, np.ndarray]:
        """Scores the `ok` rows, `forward_batch` rows per forward pass (default: all at once)."""
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


class FusionPredictor(GenrePredictor):
    """A fusion model: each row scored with the signals it has (a poster that decoded, a row in each embedding
    table; `model.fusion.fusion_inputs`, as in training); rows with none keep their poster status."""

    def __init__(self, model: torch.nn.Module, meta: ModelMeta, **options) -> None:
        super().__init__(model, meta, **options)
        self.fusion = meta.fusion_spec

    def __call__(self, batch: dict[str, np.ndarray], *, forward_batch: int | None = None) -> dict[str, np.ndarray]:
        images = batch.pop("image", None)
        inputs = fusion_inputs(batch, self.meta.signals, self.fusion.dims)
        count = len(batch["status"])
        scores = np.full((count, len(self.meta.genres)), np.nan, dtype=np.float32)
        for rows in chunks(np.flatnonzero(inputs.mask.any(axis=1)), forward_batch):
            started = time.perf_counter()
            scores[rows] = self.predict(None if images is None else images[rows], inputs, rows)
            telemetry.observe_predict_batch(time.perf_counter() - started, self.device.type)
        batch["scores"] = scores
        batch["signals"] = signal_lists(inputs.used())
        batch["status"], batch["error"] = fusion_status(batch, inputs)
        return batch

    @torch.inference_mode()
    def predict(self, images: np.ndarray | None, inputs: FusionInputs, rows: np.ndarray) -> np.ndarray:
        self.use_threads()
        mask = torch.from_numpy(inputs.mask[rows]).to(self.device)
        embeddings = {s: torch.from_numpy(e[rows]).to(self.device) for s, e in inputs.embeddings.items()}
        model_input = None
        if images is not None and POSTER in self.meta.signals:
            model_input = to_model_input(self.model_input(images).to(self.device), self.spec)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits = self.model(model_input, embeddings, mask)
        return torch.sigmoid(logits.float()).cpu().numpy()


def load_predictor(checkpoint: str | PinnedModel, *,
                   storage_options: storage.StorageOptions = storage.StorageOptions(), device: str = "auto",
                   num_threads: int | None = None, precision: str = "auto",
                   compile_model: bool = False) -> GenrePredictor:
    """The predictor the checkpoint's meta calls for (`PosterPredictor` or `FusionPredictor`), model loaded once.

    `checkpoint` is a job's `PinnedModel` (exactly those bytes, or an error) or a URI (what it means now)."""
    resolved = resolve_device(device)
    threads = num_threads or actor_cpu_count()
    use_threads(resolved, threads)
    if resolved.type == "cpu":
        reuse_freed_memory()
    dtype = autocast_dtype(precision, resolved)
    if isinstance(checkpoint, PinnedModel):
        model, meta = load_pinned(checkpoint, storage_options)
    else:
        model, meta = load_checkpoint(checkpoint, storage_options)
    predictor = FusionPredictor if meta.is_fusion else PosterPredictor
    return predictor(model, meta, device=resolved, threads=threads, autocast_dtype=dtype,
                     compile_model=compile_model)
