"""Incremental nights: which movies need scoring tonight, and the label rows of the others.

Each label row records an `input_key`: a digest of everything its scores came from (the poster's URI and
version, the title, the pinned model with its thresholds, the embedding tables). A movie whose key is unchanged
since the last committed night keeps that night's row, `labelled_at` and all; a movie whose key changed, that is
new, or whose last row failed for a reason that may pass (`fetch_failed`, `inference_failed`) is scored again.

The poster's version is what the store already knows without reading it: the ETag (and version id) of an S3
object, the size and modification time of a local file. A content hash would cost the fetch it is meant to save.

Scored rows are also staged as Parquet beside the table as soon as their block is scored, so that a night killed
before its commit, run again, reuses them ("resumed") instead of scoring them twice. The actor that does both is
`label.actor.IncrementalLabeller`; this module stays free of torch, for the Ray Data tasks that import it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from genre_pipeline.data import storage
from genre_pipeline.label.contract import INPUT_KEY
from genre_pipeline.label.origins import (
    IN_PREVIOUS_COLUMN,
    ORIGIN_CARRIED,
    ORIGIN_COLUMN,
    ORIGIN_RESUMED,
)
from genre_pipeline.statuses import STATUS_FETCH_FAILED, STATUS_INFERENCE_FAILED

if TYPE_CHECKING:
    from genre_pipeline.model.checkpoints import PinnedModel

logger = logging.getLogger(__name__)

PREVIOUS = "previous__"  # the previous night's columns, joined to the catalogue
STAGED = "staged__"  # this night's rows already scored by a run that did not commit
KNOWN_SOURCES = ((STAGED, ORIGIN_RESUMED), (PREVIOUS, ORIGIN_CARRIED))  # the first that matches is reused
# Statuses that may pass by themselves (a store that was down, a worker that died): scored again every night.
RETRIED_STATUSES = (STATUS_FETCH_FAILED, STATUS_INFERENCE_FAILED)
STAT_THREADS = 16  # object-store HEADs in flight per task
ABSENT, UNKNOWN = "absent", None


def night_inputs_digest(model: PinnedModel, tables: dict[str, str]) -> str:
    """What every row of tonight shares: the pinned model (weights and meta, thresholds included) and the
    embedding tables joined to the catalogue."""
    meta = json.dumps(dataclasses.asdict(model.meta), sort_keys=True, default=str)
    shared = json.dumps({"weights": model.weights_sha256, "meta": meta, "tables": tables}, sort_keys=True)
    return hashlib.sha256(shared.encode()).hexdigest()


def poster_version(uri: str | None, options: storage.StorageOptions) -> str | None:
    """The store's version of a poster without reading it; None when it cannot be told (the row is scored)."""
    if not isinstance(uri, str):
        return "none"
    try:
        fs, path = storage.fsspec_filesystem(uri, options)
        info = fs.info(path)
    except FileNotFoundError:
        return ABSENT
    except Exception:  # noqa: BLE001 - unknown version: score it, and let the fetch report what is wrong
        return UNKNOWN
    if storage.is_remote(uri):
        return f"{info.get('ETag', '')}:{info.get('VersionId') or ''}:{info.get('size')}"
    return f"{info.get('size')}:{info.get('mtime')}"


def add_input_keys(block: pa.Table, *, night_digest: str, options: storage.StorageOptions) -> pa.Table:
    """The block with its `input_key` column (null where a poster's version could not be read)."""
    uris = block.column("poster_uri").to_pylist()
    titles = block.column("title").to_pylist()
    remote = any(isinstance(uri, str) and storage.is_remote(uri) for uri in uris)
    if remote and len(uris) > 1:
        with ThreadPoolExecutor(max_workers=min(STAT_THREADS, len(uris))) as pool:
            versions = list(pool.map(lambda uri: poster_version(uri, options), uris))
    else:
        versions = [poster_version(uri, options) for uri in uris]
    keys = [None if version is UNKNOWN else
            hashlib.sha256(json.dumps([night_digest, uri, version, title]).encode()).hexdigest()[:32]
            for uri, version, title in zip(uris, versions, titles, strict=True)]
    return block.append_column(INPUT_KEY, pa.array(keys, pa.string()))


def prefixed(dataset: ray.data.Dataset, prefix: str) -> ray.data.Dataset:
    return dataset.rename_columns({name: prefix + name for name in dataset.columns() if name != "movie_id"})


def keep_one_row_per_movie(group: pa.Table) -> pa.Table:
    return group.slice(0, 1)


def join_known_rows(catalog: ray.data.Dataset, known: ray.data.Dataset | None, prefix: str,
                    partitions: int) -> ray.data.Dataset:
    """The catalogue with each movie's known label row beside it (columns `prefix<name>`, null when none)."""
    if known is None:
        return catalog
    return catalog.join(prefixed(known, prefix), join_type="left_outer", num_partitions=partitions,
                        on=("movie_id",))


def staged_rows(uri: str, options: storage.StorageOptions, partitions: int) -> ray.data.Dataset | None:
    """The rows this night's earlier runs scored and staged, one per movie; None when there are none."""
    fs, path = storage.arrow_filesystem(uri, options)
    try:
        files = [info.path for info in fs.get_file_info(pa.fs.FileSelector(path, allow_not_found=True))
                 if info.is_file and info.path.endswith(".parquet")]
    except OSError:
        return None
    if not files:
        return None
    logger.info("resuming: %d staged files of scored rows in %s", len(files), uri)
    staged = ray.data.read_parquet(files, filesystem=fs)
    # A block retried after its rows were staged is staged twice.
    return staged.groupby("movie_id", num_partitions=partitions).map_groups(keep_one_row_per_movie,
                                                                           batch_format="pyarrow")


def column_or_nulls(block: pa.Table, name: str, type_: pa.DataType) -> pa.ChunkedArray | pa.Array:
    if name in block.column_names:
        return block.column(name)
    return pa.nulls(block.num_rows, type_)


def reuse_origins(block: pa.Table, *, reuse: bool) -> np.ndarray:
    """Per row: where its label row comes from (`resumed`, `carried`), or None when it must be scored."""
    origins = np.full(block.num_rows, None, dtype=object)
    if not reuse:
        return origins
    key = block.column(INPUT_KEY)
    for prefix, origin in reversed(KNOWN_SOURCES):  # the first source wins: written last
        known_key = column_or_nulls(block, prefix + INPUT_KEY, pa.string())
        status = column_or_nulls(block, prefix + "status", pa.string())
        same = pc.and_(pc.equal(known_key, key), pc.invert(pc.is_in(status, pa.array(RETRIED_STATUSES))))
        origins[np.asarray(pc.fill_null(same, False))] = origin
    return origins


def rows_to_score(block: pa.Table, *, reuse: bool) -> pa.Table:
    """The block's rows whose label row cannot be reused."""
    return block.filter(pa.array(reuse_origins(block, reuse=reuse) == None))  # noqa: E711


def kept_label_rows(block: pa.Table, *, reuse: bool, schema: pa.Schema) -> pa.Table:
    """The label rows the block's other rows keep (from this night's staged rows, or the previous night), each
    with its origin."""
    origins = reuse_origins(block, reuse=reuse)
    parts = [with_origin(known_label_rows(block.filter(pa.array(origins == origin)), prefix, schema), origin,
                         block.filter(pa.array(origins == origin)))
             for prefix, origin in KNOWN_SOURCES]
    return pa.concat_tables(parts)


def known_label_rows(block: pa.Table, prefix: str, schema: pa.Schema) -> pa.Table:
    """The label rows kept from a known night (`prefix` columns) as rows of the contract."""
    columns = {"movie_id": block.column("movie_id")}
    for field in schema:
        if field.name != "movie_id":
            columns[field.name] = column_or_nulls(block, prefix + field.name, field.type).cast(field.type)
    return pa.table(columns, schema=schema)


def stage_rows(rows: pa.Table, uri: str, options: storage.StorageOptions) -> None:
    """Write scored rows to the night's staging folder in one atomic step (rename locally; one PUT on S3)."""
    fs, folder = storage.arrow_filesystem(uri, options)
    name = f"{uuid.uuid4().hex}.parquet"
    if storage.is_remote(uri):
        pq.write_table(rows, f"{folder}/{name}", filesystem=fs, compression="zstd")
        return
    os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, f".{name}.partial")
    pq.write_table(rows, partial, compression="zstd")
    os.replace(partial, os.path.join(folder, name))


def remove_staging(uri: str, options: storage.StorageOptions) -> None:
    fs, path = storage.fsspec_filesystem(uri, options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def with_origin(rows: pa.Table, origin: str, joined: pa.Table) -> pa.Table:
    """`rows` with the transient columns the sink counts: their origin, and whether the previous night had them."""
    in_previous = pc.is_valid(column_or_nulls(joined, PREVIOUS + "status", pa.string()))
    return (rows.append_column(ORIGIN_COLUMN, pa.array([origin] * rows.num_rows, pa.string()))
            .append_column(IN_PREVIOUS_COLUMN, in_previous))

