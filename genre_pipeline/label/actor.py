"""`PosterLabeller`: the label job's actor. It scores a batch of catalogue rows and returns their label rows.

On CPU it also fetches and decodes the posters, on as many threads as it scores with, while its other call scores:
separate stages would copy every poster through the object store and compete with the model for the same
cores. On GPUs fetching and decoding stay in Ray Data's CPU tasks, which scale out to as many
cores as the GPUs need.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import numpy as np
import pyarrow as pa
from ray.data.block import BlockAccessor

from genre_pipeline import failpoints
from genre_pipeline.data import storage
from genre_pipeline.data.posters import Batch, PosterPolicy, decode_posters, fetch_posters
from genre_pipeline.label.contract import labels_schema, to_label_table
from genre_pipeline.label.incremental import (
    PREVIOUS,
    STAGED,
    stage_rows,
    with_origin,
)
from genre_pipeline.label.origins import ORIGIN_SCORED
from genre_pipeline.model.checkpoints import PinnedModel
from genre_pipeline.model.predictor import GenrePredictor, load_predictor, signal_lists
from genre_pipeline.statuses import STATUS_INFERENCE_FAILED, STATUS_OK, STATUS_PARTIAL

logger = logging.getLogger(__name__)


def model_lock(predictor: GenrePredictor) -> contextlib.AbstractContextManager:
    """What the actor's two concurrent calls hold while scoring.

    A GPU, or a model on several CPU threads, takes one call at a time: the other prepares its batch meanwhile.
    A single-threaded CPU model scores both calls at once, each on its own thread: a call queued behind the
    lock would wait there while another actor, out of work at the run's end, leaves its core idle
    (docs/performance.md).
    """
    if predictor.device.type == "cpu" and predictor.threads == 1:
        return contextlib.nullcontext()
    return threading.Lock()


def mark_inference_failed(batch: Batch, error: Exception, genres: int) -> Batch:
    """The block's scored rows get `inference_failed` and the error; the others keep their status."""
    batch.pop("image", None)
    count = len(batch["status"])
    ok = np.isin(batch["status"], (STATUS_OK, STATUS_PARTIAL))
    batch["status"] = np.where(ok, STATUS_INFERENCE_FAILED, batch["status"]).astype(object)
    reason = storage.redact(f"scoring failed: {type(error).__name__}: {error}")
    batch["error"] = np.where(ok, reason, batch["error"]).astype(object)
    batch["scores"] = np.full((count, genres), np.nan, dtype=np.float32)
    batch["signals"] = signal_lists([[] for _ in range(count)])
    return batch


class PosterLabeller:
    """One model load per actor; each call: (fetch and decode,) score the `ok` rows, build the contract's rows.

    The actor loads the model the driver pinned, or refuses to start: weights or a meta (thresholds) changed
    since then would label part of the night with another model.
    """

    def __init__(self, model: PinnedModel, *, run_id: str, labelled_at: datetime, fetch_and_decode: bool,
                 device: str = "auto", precision: str = "auto", compile_model: bool = False,
                 num_threads: int | None = None, forward_batch: int | None = None,
                 storage_options: storage.StorageOptions = storage.StorageOptions(),
                 poster_policy: PosterPolicy = PosterPolicy()) -> None:
        self.predictor = load_predictor(model, storage_options=storage_options, device=device,
                                        num_threads=num_threads, precision=precision, compile_model=compile_model)
        meta = self.predictor.meta
        self.label_kwargs = {"genres": meta.genres, "thresholds": meta.thresholds_for,
                             "model_version": meta.model_version, "run_id": run_id, "labelled_at": labelled_at}
        self.decode_pool = ThreadPoolExecutor(self.predictor.threads) if fetch_and_decode else None
        self.storage_options = storage_options
        self.poster_policy = poster_policy
        self.forward_batch = forward_batch
        self.model_lock = model_lock(self.predictor)

    def __call__(self, batch: Batch) -> pa.Table:
        if self.decode_pool is not None:
            batch = fetch_posters(batch, options=self.storage_options, policy=self.poster_policy)
            batch = decode_posters(batch, image_size=self.predictor.spec.shape, pool=self.decode_pool)
        try:
            failpoints.reached("labeller.score")
            with self.model_lock:
                scored = self.predictor(batch, forward_batch=self.forward_batch)
        except Exception as error:  # one block the model cannot score must not end the night
            logger.exception("scoring a block of %d rows failed", len(batch["status"]))
            scored = mark_inference_failed(batch, error, len(self.label_kwargs["genres"]))
        return to_label_table(scored, **self.label_kwargs)


class IncrementalLabeller:
    """A PosterLabeller for the rows a night scores: their label rows, each with its origin, also staged beside
    the table as soon as they are scored (what a killed night resumes from).

    The model is loaded (and its pinned digests checked) on the first call: a refused model then reaches the
    driver as its own error (an actor dying in __init__ reaches it as a bare ActorDiedError message instead).
    """

    def __init__(self, *, staging: str, **labeller_kwargs) -> None:
        self.labeller_kwargs = labeller_kwargs
        self.labeller: PosterLabeller | None = None
        self.loading = threading.Lock()
        self.schema = labels_schema(labeller_kwargs["model"].meta.genres)
        self.staging = staging

    def __call__(self, block: pa.Table) -> pa.Table:
        with self.loading:  # the actor's two concurrent calls load one model
            if self.labeller is None:
                self.labeller = PosterLabeller(**self.labeller_kwargs)
        own = [name for name in block.column_names if not name.startswith((PREVIOUS, STAGED))]
        batch = BlockAccessor.for_block(block.select(own)).to_batch_format("numpy")
        scored = self.labeller(batch).cast(self.schema)
        stage_rows(scored, self.staging, self.labeller.storage_options)
        return with_origin(scored, ORIGIN_SCORED, block)
