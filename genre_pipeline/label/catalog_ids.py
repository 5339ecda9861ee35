"""Counting the catalogue and checking its movie ids before a night, with no per-movie state on the driver.

One Ray Data pass reads the id column and returns, per block, its rows, its nulls, the ids it holds twice, and
their range. Blocks whose ranges do not overlap (a catalogue exported in id order, as catalogues usually
are) then prove the ids unique without a shuffle; overlapping ranges fall back to a hash shuffle of the ids.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from genre_pipeline.data import storage
from genre_pipeline.data.catalog import REQUIRED_COLUMNS, CatalogError, catalog_dataset, validate_schema
from genre_pipeline.label.sizing import IO_TASK_CPUS, join_partitions

# Offending ids named in the error.
NAMED_IDS = 3


class EmptyCatalogError(CatalogError):
    """A catalogue without rows: never committed over a night of labels."""


def block_id_stats(block: pa.Table) -> pa.Table:
    """One row for the block: rows, null ids, the ids' range, and up to NAMED_IDS ids it holds twice."""
    ids = block.column("movie_id")
    valid = pc.drop_null(ids)
    counts = pc.value_counts(valid)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))[:NAMED_IDS]
    low_high = pc.min_max(valid)
    return pa.table({
        "rows": pa.array([block.num_rows], pa.int64()),
        "nulls": pa.array([ids.null_count], pa.int64()),
        "low": pa.array([low_high["min"].as_py()], ids.type),
        "high": pa.array([low_high["max"].as_py()], ids.type),
        "repeated": pa.array([repeated.to_pylist()], pa.list_(ids.type)),
    })


def ranges_overlap(stats: list[dict]) -> bool:
    """Whether any two blocks' id ranges share a value (empty or all-null blocks have no range)."""
    ranges = sorted((row["low"], row["high"]) for row in stats if row["low"] is not None)
    return any(low <= previous_high for (_, previous_high), (low, _) in zip(ranges, ranges[1:], strict=False))


def shuffled_invalid_ids(ids: ray.data.Dataset, rows: int) -> list[dict]:
    """Up to NAMED_IDS null or repeated ids, found by grouping every id (nulls group under a null key)."""
    return (ids.groupby("movie_id", num_partitions=join_partitions(rows)).count()
            .filter(lambda group: group["movie_id"] is None or group["count()"] > 1).take(NAMED_IDS))


def count_catalog(uri: str, options: storage.StorageOptions) -> int:
    """The catalogue's rows, after failing fast on missing columns, null or duplicate movie ids, or no rows."""
    fs, path = storage.arrow_filesystem(uri, options)
    try:
        schema = pq.ParquetDataset(path, filesystem=fs).schema
    except (OSError, ValueError) as error:
        raise CatalogError(f"{uri}: cannot read the catalogue: {error}") from None
    validate_schema(schema, source=uri, required=REQUIRED_COLUMNS)
    ids = catalog_dataset(path, fs, num_cpus=IO_TASK_CPUS).select_columns(["movie_id"])
    stats = ids.map_batches(block_id_stats, batch_format="pyarrow", batch_size=None,
                            num_cpus=IO_TASK_CPUS).take_all()
    rows = sum(row["rows"] for row in stats)
    if rows == 0:
        raise EmptyCatalogError(f"{uri}: the catalogue has no rows; an empty night is never committed")
    nulls = sum(row["nulls"] for row in stats)
    repeated = [value for row in stats for value in row["repeated"]][:NAMED_IDS]
    found = [f"{nulls} null"] * bool(nulls) + [f"{value} (repeated)" for value in repeated]
    if not found and ranges_overlap(stats):
        found = [f"{group['movie_id']} ({group['count()']} rows)" for group in shuffled_invalid_ids(ids, rows)]
    if found:
        raise CatalogError(f"{uri}: column 'movie_id' must be unique and not null; found {', '.join(found)}")
    return rows
