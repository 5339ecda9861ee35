"""Joining embedding tables to catalogue rows in Ray Data, and turning the joined column back into a matrix.

The join is Ray Data's hash join (a left outer join on movie_id): it streams through the cluster's object store,
nothing is gathered on the driver, and a movie without a row in a table gets a null there (no such signal).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import ray

from genre_pipeline.data import storage
from genre_pipeline.signals.embeddings import EmbeddingError, EmbeddingMeta, file_uri, read_meta

# Hash-shuffle aggregators mostly wait on their inputs: a small CPU share each, so they fit beside actors that
# hold a node's CPUs.
AGGREGATOR_CPUS = 0.1


def embedding_column(signal: str) -> str:
    return f"{signal}_embedding"


def read_embedding_dataset(uri: str, signal: str, options: storage.StorageOptions) -> ray.data.Dataset:
    fs, path = storage.arrow_filesystem(file_uri(uri), options)
    # No partitioning: the `version=<v>` folder is not a column.
    dataset = ray.data.read_parquet(path, filesystem=fs, partitioning=None)
    return dataset.rename_columns({"embedding": embedding_column(signal)})


def check_tables(tables: Mapping[str, str], options: storage.StorageOptions) -> dict[str, EmbeddingMeta]:
    """Each table's meta, once it reads and holds the signal it is given for (EmbeddingError otherwise)."""
    metas = {}
    for signal, uri in tables.items():
        meta = read_meta(uri, options)
        if meta.signal != signal:
            raise EmbeddingError(f"{file_uri(uri)}: holds {meta.signal!r} embeddings, given as {signal!r}")
        metas[signal] = meta
    return metas


def join_signals(rows: ray.data.Dataset, tables: Mapping[str, str], options: storage.StorageOptions,
                 *, partitions: int) -> ray.data.Dataset:
    """`rows` with a `<signal>_embedding` column per table (null where the table has no row for the movie)."""
    for signal, uri in tables.items():
        rows = rows.join(read_embedding_dataset(uri, signal, options), "left_outer", num_partitions=partitions,
                         on=("movie_id",), aggregator_ray_remote_args={"num_cpus": AGGREGATOR_CPUS})
    columns = [embedding_column(signal) for signal in tables]
    return rows.map_batches(missing_as_nan, fn_kwargs={"columns": columns}, batch_format="pyarrow") if tables else rows


def missing_as_nan(table: pa.Table, *, columns: list[str]) -> pa.Table:
    """Null vectors (no row in the table) as NaN vectors: every block's column is then one tensor type (Ray
    Data cannot combine blocks where it is a tensor in some and objects with None in others)."""
    for name in columns:
        column = table.column(name).combine_chunks()
        if column.null_count == 0:
            continue
        dim = column.type.list_size
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        filled = np.full((len(column), dim), np.nan, dtype=np.float32)
        filled[column.is_valid().to_numpy(zero_copy_only=False)] = values.reshape(-1, dim)
        array = pa.FixedSizeListArray.from_arrays(pa.array(filled.reshape(-1), pa.float32()), dim)
        table = table.set_column(table.schema.get_field_index(name), name, array)
    return table


def signal_matrix(column: np.ndarray | None, rows: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A joined embedding column (Ray Data hands a 2-D array or an object array of vectors; a missing movie's is NaN
    or None) -> (rows x dim float32 with zeros where missing, present: bool per row)."""
    matrix = np.full((rows, dim), np.nan, dtype=np.float32)
    if column is None:
        return np.zeros((rows, dim), np.float32), np.zeros(rows, dtype=bool)
    if column.dtype != object:
        matrix[:] = np.asarray(column, dtype=np.float32).reshape(rows, dim)
    else:  # arrays, NaN arrays (no row in the table) and None, depending on how the block was built
        for row, vector in enumerate(column):
            if vector is not None:
                matrix[row] = np.asarray(vector, dtype=np.float32)
    present = ~np.isnan(matrix).any(axis=1)
    matrix[~present] = 0.0
    return matrix, present
