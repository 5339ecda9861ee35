"""Per-batch poster fetching and decoding for Ray Data `map_batches`, shared by both jobs.

A poster that is missing, refused, fails to fetch or cannot be decoded never fails the batch: its row carries
a status and an error, and the row goes on to the output. A `PosterPolicy` says what may be read: posters
under its roots (after resolving symlinks and `..`), regular files only, at most `max_bytes` each.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from genre_pipeline import telemetry
from genre_pipeline.data import storage
from genre_pipeline.data.images import PosterDecodeError, Size, as_shape, decode_poster
from genre_pipeline.statuses import STATUS_FETCH_FAILED, STATUS_MISSING, STATUS_OK, STATUS_REFUSED, STATUS_UNREADABLE

logger = logging.getLogger(__name__)

# Object-store GETs are latency-bound (tens of ms each): overlap them within a batch. Local reads gain little.
FETCH_THREADS = 16

# A poster scan is a few MB; this bounds what one catalogue row can make a worker hold.
DEFAULT_MAX_POSTER_BYTES = 32 * 1024 * 1024

Batch = dict[str, np.ndarray]


class PosterRefused(Exception):
    """A poster URI the policy does not allow reading; the message says why."""


@dataclass(frozen=True)
class PosterPolicy:
    roots: tuple[str, ...] = ()  # resolved local folders and s3://bucket/prefix; empty: anywhere
    max_bytes: int = DEFAULT_MAX_POSTER_BYTES

    @classmethod
    def under(cls, roots: list[str], max_bytes: int = DEFAULT_MAX_POSTER_BYTES) -> PosterPolicy:
        return cls(tuple(resolve_root(root) for root in roots), max_bytes)


def resolve_root(root: str) -> str:
    if storage.is_remote(root):
        return normalise_s3(root).rstrip("/") + "/"
    return os.path.realpath(storage.fsspec_filesystem(root)[1]).rstrip(os.sep) + os.sep


def normalise_s3(uri: str) -> str:
    """`..` and `.` folded, as a path would be: the key a reader would be tricked into is the folded one."""
    bucket, key = storage.bucket_and_key(uri)
    return f"s3://{bucket}/{posixpath.normpath('/' + key).lstrip('/')}"


def allowed_location(uri: str, policy: PosterPolicy) -> str:
    """The resolved location of `uri` (symlinks and `..` followed) when it lies under a root; else refused."""
    remote = storage.is_remote(uri)
    location = normalise_s3(uri) if remote else os.path.realpath(storage.fsspec_filesystem(uri)[1])
    if policy.roots and not any(location.startswith(root) for root in policy.roots):
        raise PosterRefused(f"{location if location != uri else 'it'} is outside the poster roots "
                            f"({', '.join(policy.roots)}; see --poster-root)")
    return location


def read_local_poster(path: str, max_bytes: int) -> bytes:
    """A regular file's bytes, up to `max_bytes`. O_NONBLOCK: opening a FIFO must not wait for a writer."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise PosterRefused("not a regular file")
        if info.st_size > max_bytes:
            raise PosterRefused(f"{info.st_size:,} bytes, over --max-poster-bytes {max_bytes:,}")
        return handle.read(max_bytes + 1)  # a file that grew since fstat is caught below


def read_poster(uri: str, options: storage.StorageOptions, policy: PosterPolicy) -> bytes:
    location = allowed_location(uri, policy)
    if storage.is_remote(location):
        fs, path = storage.fsspec_filesystem(location, options)
        data = fs.cat_file(path, start=0, end=policy.max_bytes + 1)  # never more than the cap travels
    else:
        data = read_local_poster(location, policy.max_bytes)
    if len(data) > policy.max_bytes:
        raise PosterRefused(f"over --max-poster-bytes {policy.max_bytes:,}")
    return data


def fetch_one(uri: str | None, options: storage.StorageOptions,
              policy: PosterPolicy = PosterPolicy()) -> tuple[bytes | None, str, str | None]:
    """(bytes, status, error) for one poster URI."""
    if uri is None or (isinstance(uri, float) and np.isnan(uri)) or not str(uri).strip():
        return None, STATUS_MISSING, "no poster_uri"
    try:
        return read_poster(str(uri), options, policy), STATUS_OK, None
    except PosterRefused as refusal:
        return None, STATUS_REFUSED, storage.redact(f"{uri}: refused: {refusal}")
    except FileNotFoundError:
        return None, STATUS_MISSING, storage.redact(f"{uri}: not found")
    except Exception as error:  # network, permissions, throttling, bad scheme: all mean "could not fetch"
        return None, STATUS_FETCH_FAILED, storage.redact(f"{uri}: {type(error).__name__}: {error}")


def fetch_posters(batch: Batch, *, options: storage.StorageOptions = storage.StorageOptions(),
                  policy: PosterPolicy = PosterPolicy()) -> Batch:
    """Add `poster_bytes`, `status` and `error` columns."""
    uris = list(batch["poster_uri"])
    remote = any(isinstance(u, str) and storage.is_remote(u) for u in uris)
    if remote and len(uris) > 1:
        with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(uris))) as pool:
            results = list(pool.map(lambda u: fetch_one(u, options, policy), uris))
    else:
        results = [fetch_one(u, options, policy) for u in uris]
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
            return storage.redact(f"{batch['poster_uri'][row]}: {failure}")

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
