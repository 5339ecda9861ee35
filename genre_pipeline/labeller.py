"""`PosterLabeller`: the label job's actor. It scores a batch of catalogue rows and returns their label rows.

On CPU it also fetches and decodes the posters, on as many threads as it scores with, while its other call scores the
previous batch: separate stages would copy every poster through the object store and compete with the model
for the same cores. On GPUs fetching and decoding stay in Ray Data's CPU tasks, which scale out to as many
cores as the GPUs need.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pyarrow as pa

from genre_pipeline import storage
from genre_pipeline.inference import GenrePredictor
from genre_pipeline.labels import to_label_table
from genre_pipeline.posters import Batch, decode_posters, fetch_posters

logger = logging.getLogger(__name__)


class PosterLabeller:
    """One model load per actor; each call: (fetch and decode,) score the `ok` rows, build the contract's rows."""

    def __init__(self, checkpoint_uri: str, *, run_id: str, labelled_at: datetime, fetch_and_decode: bool,
                 device: str = "auto", precision: str = "auto", compile_model: bool = False,
                 num_threads: int | None = None, forward_batch: int | None = None,
                 storage_options: storage.StorageOptions = storage.StorageOptions()) -> None:
        self.predictor = GenrePredictor(checkpoint_uri, storage_options=storage_options, device=device,
                                        num_threads=num_threads, precision=precision, compile_model=compile_model)
        meta = self.predictor.meta
        self.label_kwargs = {"genres": meta.genres, "thresholds": meta.threshold_array,
                             "model_version": meta.model_version, "run_id": run_id, "labelled_at": labelled_at}
        self.decode_pool = ThreadPoolExecutor(self.predictor.threads) if fetch_and_decode else None
        self.storage_options = storage_options
        self.forward_batch = forward_batch
        self.model_lock = threading.Lock()

    def __call__(self, batch: Batch) -> pa.Table:
        if self.decode_pool is not None:
            batch = fetch_posters(batch, options=self.storage_options)
            batch = decode_posters(batch, image_size=self.predictor.spec.image_size, pool=self.decode_pool)
        with self.model_lock:  # Ray Data runs two calls at once: one prepares its batch, one scores
            scored = self.predictor(batch, forward_batch=self.forward_batch)
        return to_label_table(scored, **self.label_kwargs)
