"""Committing a night's labels: one Parquet object per night, replaced atomically, and only by one run.

Under the labels root there is nothing but `run_date=<date>/labels.parquet`, so every reader (the documented
`run_date=*/*.parquet` glob, Spark or Hive on the root, Polars scanning the root) sees whole nights only.

- While the actors score, the driver spools the night to one local Parquet file (`NightSpool`), counting rows
  by status and checking that every catalogue movie is there exactly once.
- The commit replaces the night's object in one atomic step, conditioned on the version the run saw when it
  started (`NightStore.current_version`), so of two runs of one night exactly one commits; the other raises
  `NightChangedError` and leaves the night alone.
  - S3: one PutObject with `If-Match: <ETag seen>` (`If-None-Match: *` for a new night). A PUT becomes visible
    whole or not at all; a failed precondition means another run committed first.
  - Local or POSIX shared storage: the spool is written in a staging folder beside the root; under an exclusive
    lock on the night's folder the version is compared, then `os.replace` swaps the file in.
- Killed at any point, the night is either the old one or the new one; a killed run leaves only its spool.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import botocore.exceptions
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genre_pipeline import failpoints
from genre_pipeline.data import storage
from genre_pipeline.errors import JobInputError
from genre_pipeline.label.contract import PARTITION_KEY
from genre_pipeline.model.fusion import POSTER

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.parquet"
ROW_GROUP_ROWS = 100_000  # rows per Parquet row group: the unit a warehouse scans in parallel
MAX_PUT_BYTES = 5 * 1024**3  # S3's limit for a single PutObject, the atomic step of the commit
PRECONDITION_CODES = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


class OutputIncompleteError(JobInputError, RuntimeError):
    """The spooled night does not hold every catalogue row exactly once; nothing was committed."""


class NightChangedError(JobInputError, RuntimeError):
    """Another run committed this night while this one ran; this run committed nothing."""


@dataclass(frozen=True)
class NightVersion:
    token: str | None  # S3 ETag, or "inode:mtime_ns:size" locally; None when the night has no labels yet


class NightSpool:
    """The night's label rows in one local Parquet file, written as the blocks arrive."""

    def __init__(self, path: Path, schema: pa.Schema, *, poster_signal: bool = True) -> None:
        self.path = path
        self.schema = schema
        self.poster_signal = poster_signal  # the model scores posters: a poster that failed counts against the night
        self.writer = pq.ParquetWriter(path, schema, compression="zstd")
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.statuses: Counter[str] = Counter()
        self.movie_ids: list[np.ndarray] = []
        self.posters = 0  # rows with a poster_uri
        self.failed_by_status: Counter[str] = Counter()  # of those, the rows scored without their poster
        self.first_error: str | None = None

    def write(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        statuses = table.column("status").to_pylist()
        self.statuses.update(statuses)
        with_poster = [uri is not None for uri in table.column("poster_uri").to_pylist()]
        signals = table.column("signals").to_pylist()
        failed = [i for i, (has, used) in enumerate(zip(with_poster, signals, strict=True))
                  if has and self.poster_signal and POSTER not in (used or ())]
        self.posters += sum(with_poster)
        self.failed_by_status.update(statuses[i] for i in failed)
        if failed and self.first_error is None:
            self.first_error = table.column("error")[failed[0]].as_py()
        self.movie_ids.append(table.column("movie_id").to_numpy())
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=ROW_GROUP_ROWS)
        self.pending, self.pending_rows = [], 0

    @property
    def failed_posters(self) -> int:
        return sum(self.failed_by_status.values())

    def close(self, expected_rows: int) -> dict[str, int]:
        """Finish the file; rows by status, once every catalogue row is there exactly once."""
        self._flush()
        self.writer.close()
        ids = np.concatenate(self.movie_ids) if self.movie_ids else np.zeros(0, np.int64)
        distinct = len(np.unique(ids))
        if len(ids) != expected_rows or distinct != expected_rows:
            raise OutputIncompleteError(
                f"{self.path}: {len(ids)} rows, {distinct} distinct movie_id, expected {expected_rows}; "
                "nothing committed")
        return dict(self.statuses)


@dataclass(frozen=True)
class NightStore:
    root: str  # labels root URI
    run_date: str
    run_id: str
    options: storage.StorageOptions = storage.StorageOptions()

    @property
    def partition_uri(self) -> str:
        return storage.join(self.root, f"{PARTITION_KEY}={self.run_date}")

    @property
    def labels_uri(self) -> str:
        return storage.join(self.partition_uri, LABELS_FILE)

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.root)

    def staging_dir(self) -> Path:
        """Local roots: a folder beside the root (same filesystem, so the commit is a rename; outside the root,
        so no reader sees it). S3 roots: this machine's temporary folder."""
        if self.remote:
            return Path(tempfile.gettempdir()) / "genre-pipeline-spool"
        root = Path(storage.fsspec_filesystem(self.root)[1])
        return root.parent / f".{root.name}.staging"

    def open_spool(self, schema: pa.Schema, *, poster_signal: bool = True) -> NightSpool:
        folder = self.staging_dir()
        folder.mkdir(parents=True, exist_ok=True)
        self._remove_abandoned_spools(folder)
        return NightSpool(folder / f"{self.run_date}-{self.run_id}.parquet", schema, poster_signal=poster_signal)

    def _remove_abandoned_spools(self, folder: Path) -> None:
        """Spools of this night whose run is gone: a live run holds a lock on its spool (`hold_spool`)."""
        for spool in folder.glob(f"{self.run_date}-*.parquet"):
            with contextlib.suppress(OSError), open(spool, "rb") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a run of this night is writing it
                spool.unlink()
                logger.info("removed %s, left by a run that did not finish", spool)

    @contextlib.contextmanager
    def hold_spool(self, spool: NightSpool):
        """Hold a lock on the spool while this run lives (released by the kernel if it is killed); remove the
        spool when the run ends."""
        with open(spool.path, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                spool.path.unlink(missing_ok=True)

    def current_version(self) -> NightVersion:
        if self.remote:
            bucket, key = storage.bucket_and_key(self.labels_uri)
            with storage.reporting_errors(self.labels_uri, "read"):
                try:
                    head = storage.s3_client(self.options).head_object(Bucket=bucket, Key=key)
                except botocore.exceptions.ClientError as error:
                    if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                        return NightVersion(None)
                    raise
            return NightVersion(head["ETag"])
        try:
            stat = os.stat(storage.fsspec_filesystem(self.labels_uri)[1])
        except FileNotFoundError:
            return NightVersion(None)
        return NightVersion(f"{stat.st_ino}:{stat.st_mtime_ns}:{stat.st_size}")

    def commit(self, spool: Path, seen: NightVersion) -> None:
        """Make `spool` the night's labels if the night is still at version `seen`; else NightChangedError."""
        started = time.monotonic()
        failpoints.reached("commit.start")
        if self.remote:
            self._put(spool, seen)
            self._remove_other_files()
        else:
            self._replace(spool, seen)
        failpoints.reached("commit.done")
        logger.info("committed %s in %.2fs", self.labels_uri, time.monotonic() - started)

    def _changed(self, seen: NightVersion) -> NightChangedError:
        return NightChangedError(
            f"{self.partition_uri}: another run committed this night while run {self.run_id} ran (its version "
            f"{seen.token or 'none'} is gone); nothing committed. Check the night, then re-run it if needed.")

    def _put(self, spool: Path, seen: NightVersion) -> None:
        size = spool.stat().st_size
        if size > MAX_PUT_BYTES:
            raise storage.StorageError(
                f"{self.labels_uri}: the night is {size:,} bytes, over S3's {MAX_PUT_BYTES:,} for one atomic PUT")
        bucket, key = storage.bucket_and_key(self.labels_uri)
        condition = {"IfMatch": seen.token} if seen.token else {"IfNoneMatch": "*"}
        failpoints.reached("commit.putting")
        with storage.reporting_errors(self.labels_uri, "write"), open(spool, "rb") as body:
            try:
                storage.s3_client(self.options).put_object(Bucket=bucket, Key=key, Body=body, **condition)
            except botocore.exceptions.ClientError as error:
                if error.response.get("Error", {}).get("Code") in PRECONDITION_CODES:
                    raise self._changed(seen) from None
                raise

    def _replace(self, spool: Path, seen: NightVersion) -> None:
        partition = Path(storage.fsspec_filesystem(self.partition_uri)[1])
        partition.mkdir(parents=True, exist_ok=True)
        folder = os.open(partition, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)  # one committer per night; released if this process dies
            failpoints.reached("commit.locked")
            if self.current_version() != seen:
                raise self._changed(seen)
            staged = self._same_filesystem_copy(spool, partition)
            failpoints.reached("commit.replacing")
            os.replace(staged, partition / LABELS_FILE)
            os.fsync(folder)  # the rename itself survives a power loss
            self._remove_other_files()
        finally:
            os.close(folder)

    def _same_filesystem_copy(self, spool: Path, partition: Path) -> Path:
        """The spool itself when it can be renamed into the partition; else a copy beside it (a root that is a
        mount point of its own), hidden and not named *.parquet, for the moment of the copy."""
        with open(spool, "rb") as handle:
            os.fsync(handle.fileno())
        if os.stat(spool).st_dev == os.stat(partition).st_dev:
            return spool
        staged = partition / f".{LABELS_FILE}.{self.run_id}.tmp"
        shutil.copyfile(spool, staged)
        with open(staged, "rb") as handle:
            os.fsync(handle.fileno())
        return staged

    def _remove_other_files(self) -> None:
        """Anything else in the night's folder (files of the multi-file layout before this one) would be read as
        more rows of the night."""
        fs, partition = storage.fsspec_filesystem(self.partition_uri, self.options)
        for path in fs.find(partition):
            if path.rsplit("/", 1)[-1] != LABELS_FILE:
                fs.rm_file(path)
                logger.info("removed %s from the committed night", path)
