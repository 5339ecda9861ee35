"""Committing a night's labels so that readers never see half a night.

The job writes into `<root>/_staging/run_date=<date>/<run_id>/` (engines skip paths starting with `_`, and the
documented `<root>/run_date=*/*.parquet` glob does not reach it), checks that every catalogue row is there exactly once,
then swaps the staging folder in as `<root>/run_date=<date>/`. On a local or POSIX shared filesystem each step
is a rename (atomic); on S3 a rename is a copy, so the swap takes as long as copying one night's files.
A run killed before the swap leaves only staging debris, which the next run for that night deletes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow.dataset as pads

from genre_pipeline import storage
from genre_pipeline.labels import PARTITION_KEY

logger = logging.getLogger(__name__)

STAGING_DIR = "_staging"
TRASH_DIR = "_replaced"


class OutputIncompleteError(RuntimeError):
    """The staged output does not hold every catalogue row exactly once; nothing was committed."""


@dataclass(frozen=True)
class NightOutput:
    root: str  # labels root URI
    run_date: str
    run_id: str
    options: storage.StorageOptions = storage.StorageOptions()

    @property
    def _night(self) -> str:
        return f"{PARTITION_KEY}={self.run_date}"

    @property
    def staging_uri(self) -> str:
        return storage.join(self.root, STAGING_DIR, self._night, self.run_id)

    @property
    def partition_uri(self) -> str:
        return storage.join(self.root, self._night)

    def staged_dataset(self) -> pads.Dataset:
        fs, path = storage.arrow_filesystem(self.staging_uri, self.options)
        return pads.dataset(path, filesystem=fs, format="parquet")

    def check_complete(self, expected_ids: int) -> dict[str, int]:
        """Row count and uniqueness of movie_id in staging; returns rows by status."""
        table = self.staged_dataset().to_table(columns=["movie_id", "status"])
        unique = len(set(table.column("movie_id").to_pylist()))
        if table.num_rows != expected_ids or unique != expected_ids:
            raise OutputIncompleteError(
                f"{self.staging_uri}: {table.num_rows} rows, {unique} distinct movie_id, expected {expected_ids}"
            )
        counts = table.group_by("status").aggregate([("movie_id", "count")]).to_pylist()
        return {row["status"]: row["movie_id_count"] for row in counts}

    def commit(self) -> None:
        """Swap staging in as the night's partition, replacing an earlier run of the same night."""
        fs, root = storage.fsspec_filesystem(self.root, self.options)
        partition, staging = f"{root}/{self._night}", f"{root}/{STAGING_DIR}/{self._night}/{self.run_id}"
        replaced = f"{root}/{TRASH_DIR}/{self._night}/{self.run_id}"
        if fs.exists(partition):
            fs.makedirs(replaced.rsplit("/", 1)[0], exist_ok=True)
            self._move(fs, partition, replaced)
        self._move(fs, staging, partition)
        if fs.exists(replaced):
            fs.rm(replaced, recursive=True)
        logger.info("committed %s", self.partition_uri)

    def _move(self, fs, source: str, target: str) -> None:
        """A folder rename locally (atomic). On S3, file by file: fsspec's recursive mv also "copies" the folder
        itself, which on S3 is no object, and fails with NoSuchKey after copying the files."""
        if not storage.is_remote(self.root):
            fs.mv(source, target, recursive=True)
            return
        files = fs.find(source)
        fs.copy(files, [target + name[len(source):] for name in files])
        fs.rm(source, recursive=True)

    def clean_stale(self) -> None:
        """Delete this night's staging and replaced folders left by earlier, killed runs (other nights'
        runs may be in flight: their folders are left alone)."""
        fs, root = storage.fsspec_filesystem(self.root, self.options)
        for folder in (STAGING_DIR, TRASH_DIR):
            if fs.exists(f"{root}/{folder}/{self._night}"):
                fs.rm(f"{root}/{folder}/{self._night}", recursive=True)
