"""Per-batch poster fetching and decoding for Ray Data `map_batches`, shared by both jobs.

A poster that is missing, fails to fetch or cannot be decoded never fails the batch: its row carries a
status and an error, and the row goes on to the output.
"""

from __future__ import annotations

import logging
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np

from genre_pipeline import storage, telemetry
from genre_pipeline.images import PosterDecodeError, Size, as_shape, decode_poster
from genre_pipeline.labels import STATUS_FETCH_FAILED, STATUS_MISSING, STATUS_OK, STATUS_UNREADABLE

logger = logging.getLogger(__name__)

# Object-store GETs are latency-bound (tens of ms each): overlap them within a batch. Local reads gain little.
FETCH_THREADS = 16

Batch = dict[str, np.ndarray]


def fetch_one(uri: str | None, options: storage.StorageOptions) -> tuple[bytes | None, str, str | None]:
    """(bytes, status, error) for one poster URI."""
    if uri is None or (isinstance(uri, float) and np.isnan(uri)) or not str(uri).strip():
        return None, STATUS_MISSING, "no poster_uri"
    try:
        return storage.read_bytes(str(uri), options), STATUS_OK, None
    except FileNotFoundError:
        return None, STATUS_MISSING, f"{uri}: not found"
    except Exception as error:  # network, permissions, throttling, bad scheme: all mean "could not fetch"
        return None, STATUS_FETCH_FAILED, f"{uri}: {type(error).__name__}: {error}"


def fetch_posters(batch: Batch, *, options: storage.StorageOptions = storage.StorageOptions()) -> Batch:
    """Add `poster_bytes`, `status` and `error` columns."""
    uris = list(batch["poster_uri"])
    remote = any(isinstance(u, str) and storage.is_remote(u) for u in uris)
    if remote and len(uris) > 1:
        with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(uris))) as pool:
            results = list(pool.map(lambda u: fetch_one(u, options), uris))
    else:
        results = [fetch_one(u, options) for u in uris]
    batch["poster_bytes"] = _object_array([r[0] for r in results])
    batch["status"] = _object_array([r[1] for r in results])
    batch["error"] = _object_array([r[2] for r in results])
    return batch


def decode_posters(batch: Batch, *, image_size: Size, pool: Executor | None = None) -> Batch:
    """Replace `poster_bytes` by `image` (uint8, N×H×W×3 of `image_size`); rows that do not decode get zeros and
    a status.

    With a `pool`, posters decode on its threads: PIL's decoder and torch's resize release the GIL, so a batch
    uses every core the caller holds instead of one.
    """
    count = len(batch["status"])
    images = np.zeros((count, *as_shape(image_size), 3), dtype=np.uint8)
    status, error = batch["status"].copy(), batch["error"].copy()
    rows = [row for row in range(count) if status[row] == STATUS_OK]
    data = batch.pop("poster_bytes")

    def decode_into(row: int) -> str | None:
        try:
            decode_poster(data[row], image_size, out=images[row])
            return None
        except PosterDecodeError as failure:
            return f"{batch['poster_uri'][row]}: {failure}"

    failures = pool.map(decode_into, rows) if pool is not None else map(decode_into, rows)
    for row, failure in zip(rows, failures, strict=True):
        if failure is not None:
            status[row], error[row] = STATUS_UNREADABLE, failure
    batch["image"], batch["status"], batch["error"] = images, status, error
    telemetry.count_posters(status)  # here the status is final: fetched, then decoded
    return batch


def _object_array(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array
