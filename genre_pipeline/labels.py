"""The labels contract: the Arrow schema the label job writes and a warehouse reads with SQL."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from genre_pipeline.genres import GENRES, score_columns

STATUS_OK = "ok"
STATUS_MISSING = "missing_poster"
STATUS_UNREADABLE = "unreadable_poster"
STATUS_FETCH_FAILED = "fetch_failed"
STATUSES = (STATUS_OK, STATUS_MISSING, STATUS_UNREADABLE, STATUS_FETCH_FAILED)

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
