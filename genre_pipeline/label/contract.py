"""The labels contract: the Arrow schema the label job writes and a warehouse reads with SQL."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import numpy as np
import pyarrow as pa

from genre_pipeline import telemetry
from genre_pipeline.genres import GENRES, labels_from_scores, score_columns, top_genres

# Hive-style partition directory under the labels root: labels/run_date=YYYY-MM-DD/*.parquet
PARTITION_KEY = "run_date"


def labels_schema(genres: Sequence[str] = GENRES) -> pa.Schema:
    """One row per catalogue movie. `run_date` is not in the files: it is the partition directory."""
    return pa.schema(
        [
            pa.field("movie_id", pa.int64(), nullable=False),
            pa.field("title", pa.string()),
            pa.field("poster_uri", pa.string()),
            *[pa.field(name, pa.float32()) for name in score_columns(genres)],
            pa.field("genres", pa.list_(pa.string())),
            pa.field("top_genre", pa.string()),
            pa.field("status", pa.string(), nullable=False),
            pa.field("error", pa.string()),
            pa.field("model_version", pa.string(), nullable=False),
            pa.field("labelled_at", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("run_id", pa.string(), nullable=False),
        ]
    )


def _string_array(values: np.ndarray) -> pa.Array:
    """Strings with nulls. A batch whose column is all null can reach us as a float NaN array after Ray Data's
    Arrow round trip, so anything that is not a string is a null."""
    return pa.array([v if isinstance(v, str) else None for v in values], pa.string())


def to_label_table(
    batch: dict[str, np.ndarray], *, genres: Sequence[str], thresholds: np.ndarray, model_version: str,
    run_id: str, labelled_at: datetime,
) -> pa.Table:
    """Scores (NaN for rows without a usable poster) -> the label rows of the contract."""
    scores = np.asarray(batch["scores"], dtype=np.float32).reshape(len(batch["movie_id"]), len(genres))
    ok = ~np.isnan(scores).any(axis=1)
    predicted = labels_from_scores(np.nan_to_num(scores, nan=-1.0), thresholds, genres)
    top = top_genres(np.nan_to_num(scores, nan=-1.0), genres) if len(scores) else []
    count = len(scores)
    columns = {
        "movie_id": pa.array(batch["movie_id"], pa.int64()),
        "title": _string_array(batch["title"]),
        "poster_uri": _string_array(batch["poster_uri"]),
        **{name: pa.array(scores[:, i], pa.float32(), mask=~ok) for i, name in enumerate(score_columns(genres))},
        "genres": pa.array([g if keep else None for g, keep in zip(predicted, ok, strict=True)],
                           pa.list_(pa.string())),
        "top_genre": pa.array([t if keep else None for t, keep in zip(top, ok, strict=True)], pa.string()),
        "status": _string_array(batch["status"]),
        "error": _string_array(batch["error"]),
        "model_version": pa.array([model_version] * count, pa.string()),
        "labelled_at": pa.array([labelled_at] * count, pa.timestamp("us", tz="UTC")),
        "run_id": pa.array([run_id] * count, pa.string()),
    }
    table = pa.table(columns, schema=labels_schema(genres))
    telemetry.count_label_rows_written(table.num_rows)  # the last step before the writer
    return table
