"""Per-batch poster fetching and decoding for Ray Data `map_batches`, shared by both jobs.

A poster that is missing, refused, fails to fetch or cannot be decoded never fails the batch: its row carries
a status and an error, and the row goes on to the output. A `PosterPolicy` says what may be read: posters
under its roots (after resolving symlinks and `..`), regular files only, at most `max_bytes` each. A local poster
is then opened beneath its root's folder without following any symlink, so a path changed after the check
cannot lead the read outside the roots.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import platform
import posixpath
import stat
import sys
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from genre_pipeline import failpoints, telemetry
from genre_pipeline.data import storage
from genre_pipeline.data.images import PosterDecodeError, Size, as_shape, decode_poster
from genre_pipeline.statuses import STATUS_FETCH_FAILED, STATUS_MISSING, STATUS_OK, STATUS_REFUSED, STATUS_UNREADABLE

logger = logging.getLogger(__name__)

# Object-store GETs are latency-bound (tens of ms each): overlap them within a batch. Local reads gain little.
FETCH_THREADS = 16

# A poster scan is a few MB; this bounds what one catalogue row can make a worker hold.
DEFAULT_MAX_POSTER_BYTES = 32 * 1024 * 1024

# openat2(2) (Linux 5.6+) resolves a path beneath a folder in one call, refusing symlinks and `..` escapes.
# The syscall number is 437 on both architectures we run on; elsewhere the component walk does the same job.
OPENAT2_SYSCALL = 437 if sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64") else None
RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x04, 0x08
# What a kernel without openat2 (ENOSYS) or a seccomp profile that blocks it (EPERM) answers: walk instead.
OPENAT2_UNAVAILABLE = (errno.ENOSYS, errno.EPERM)
# O_NONBLOCK: opening a FIFO must not wait for a writer.
POSTER_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
# O_PATH: walking through a folder needs only search permission, as a path lookup does. Without O_PATH (not
# Linux), O_NONBLOCK keeps a FIFO met on the way from blocking the open.
FOLDER_OPEN_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

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
    """The resolved location of `uri` (symlinks and `..` followed) when it lies under a root; else refused.

    The refusal names no resolved path: the error column would show where a symlink leads outside the roots.
    """
    remote = storage.is_remote(uri)
    location = normalise_s3(uri) if remote else os.path.realpath(storage.fsspec_filesystem(uri)[1])
    if policy.roots and not any(location.startswith(root) for root in policy.roots):
        raise PosterRefused(f"outside the poster roots ({', '.join(policy.roots)}; see --poster-root)")
    return location


def local_root(location: str, policy: PosterPolicy) -> str:
    """The innermost root holding the resolved `location`; the filesystem's root when the policy allows anywhere."""
    holding = [root for root in policy.roots if location.startswith(root)]
    return max(holding, key=len) if holding else os.sep


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def openat2(folder: int, path: str, flags: int, resolve: int) -> int:
    """openat2(2) through libc's `syscall`; OSError(ENOSYS) where this platform has no number for it."""
    if OPENAT2_SYSCALL is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    how, encoded = _OpenHow(flags, 0, resolve), ctypes.c_char_p(os.fsencode(path))
    descriptor = _libc().syscall(ctypes.c_long(OPENAT2_SYSCALL), ctypes.c_int(folder), encoded, ctypes.byref(how),
                                 ctypes.c_size_t(ctypes.sizeof(how)))
    if descriptor < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return descriptor


def open_beneath(root: int, relative: str) -> int:
    """A descriptor for `relative` under the folder `root`, opened without following any symlink or leaving it."""
    try:
        return openat2(root, relative, POSTER_OPEN_FLAGS, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
    except OSError as error:
        if error.errno not in OPENAT2_UNAVAILABLE:
            raise
    return open_by_walking(root, relative)


def open_by_walking(root: int, relative: str) -> int:
    """`open_beneath` without openat2: each folder opened from the one before with O_NOFOLLOW and checked."""
    *names, file_name = relative.split(os.sep)
    folder = os.dup(root)
    try:
        for name in names:
            if name in ("", ".", ".."):  # a resolved path has none; `..` could climb out of the root
                raise OSError(errno.EXDEV, "a '..' or empty component")
            inner = open_folder(name, folder)
            os.close(folder)
            folder = inner
        return os.open(file_name, POSTER_OPEN_FLAGS, dir_fd=folder)
    finally:
        os.close(folder)


def open_folder(path: str, parent: int | None = None) -> int:
    """A descriptor for the folder `path` (relative to `parent`); ELOOP if it is a symlink, ENOTDIR if no folder."""
    folder = os.open(path, FOLDER_OPEN_FLAGS, dir_fd=parent)
    mode = os.fstat(folder).st_mode
    if stat.S_ISDIR(mode):
        return folder
    os.close(folder)
    # O_PATH | O_NOFOLLOW opens a symlink itself rather than failing on it
    code = errno.ELOOP if stat.S_ISLNK(mode) else errno.ENOTDIR
    raise OSError(code, os.strerror(code))


def read_local_poster(location: str, root: str, max_bytes: int) -> bytes:
    """The bytes of the regular file at the resolved `location`, opened beneath `root`, up to `max_bytes`.

    Errors carry no path: the caller names the poster by its URI.
    """
    try:
        root_folder = open_folder(root)
        try:
            descriptor = open_beneath(root_folder, os.path.relpath(location, root))
        finally:
            os.close(root_folder)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise PosterRefused("a symlink on its path, which changed after the roots check") from None
        if error.errno == errno.EXDEV:
            raise PosterRefused("its path leads outside the poster root") from None
        raise OSError(error.errno, error.strerror) from None  # the same subclass, without the path
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise PosterRefused("not a regular file")
        if info.st_size > max_bytes:
            raise PosterRefused(f"{info.st_size:,} bytes, over --max-poster-bytes {max_bytes:,}")
        return handle.read(max_bytes + 1)  # a file that grew since fstat is caught below


def read_poster(uri: str, options: storage.StorageOptions, policy: PosterPolicy) -> bytes:
    location = allowed_location(uri, policy)
    failpoints.reached("poster.checked")  # between check and open: where a swapped path component would strike
    if storage.is_remote(location):
        fs, path = storage.fsspec_filesystem(location, options)
        data = fs.cat_file(path, start=0, end=policy.max_bytes + 1)  # never more than the cap travels
    else:
        data = read_local_poster(location, local_root(location, policy), policy.max_bytes)
    if len(data) > policy.max_bytes:
        raise PosterRefused(f"over --max-poster-bytes {policy.max_bytes:,}")
    return data


def fetch_one(uri: str | None, options: storage.StorageOptions,
              policy: PosterPolicy = PosterPolicy()) -> tuple[bytes | None, str, str | None]:
    """(bytes, status, error) for one poster URI."""
    if uri is None or (isinstance(uri, float) and np.isnan(uri)) or not str(uri).strip():
        return None, STATUS_MISSING, "no poster_uri"
    uri = str(uri)
    try:
        return read_poster(uri, options, policy), STATUS_OK, None
    except PosterRefused as refusal:
        return None, STATUS_REFUSED, storage.redact(f"{uri}: refused: {refusal}", uri)
    except FileNotFoundError:
        return None, STATUS_MISSING, storage.redact(f"{uri}: not found", uri)
    except Exception as error:  # network, permissions, throttling, bad scheme: all mean "could not fetch"
        return None, STATUS_FETCH_FAILED, storage.redact(f"{uri}: {type(error).__name__}: {error}", uri)


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
            uri = batch["poster_uri"][row]
            return storage.redact(f"{uri}: {failure}", uri)

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
