"""The labels contract: the Arrow schema the label job writes and a warehouse reads with SQL."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

import numpy as np
import pyarrow as pa

from genre_pipeline import telemetry
from genre_pipeline.genres import GENRES, labels_from_scores, score_columns, top_genres
from genre_pipeline.model.signals import subset_name

# The night a label row belongs to: a tag per night on the labels table, a partition key in older layouts.
PARTITION_KEY = "run_date"
# A digest of what a row was scored from (label/incremental.py): unchanged inputs keep the row the next night.
INPUT_KEY = "input_key"


def labels_schema(genres: Sequence[str] = GENRES) -> pa.Schema:
    """One row per catalogue movie; the night is the table's snapshot (tagged with its run date)."""
    return pa.schema(
        [
            pa.field("movie_id", pa.int64(), nullable=False),
            pa.field("title", pa.string()),
            pa.field("poster_uri", pa.string()),
            *[pa.field(name, pa.float32()) for name in score_columns(genres)],
            pa.field("genres", pa.list_(pa.string())),
            pa.field("top_genre", pa.string()),
            pa.field("signals", pa.list_(pa.string())),  # what the scores came from; empty when not scored
            pa.field("status", pa.string(), nullable=False),
            pa.field("error", pa.string()),
            pa.field("model_version", pa.string(), nullable=False),
            pa.field("labelled_at", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("run_id", pa.string(), nullable=False),
            pa.field(INPUT_KEY, pa.string()),
        ]
    )


def _string_array(values: np.ndarray) -> pa.Array:
    """Strings with nulls. A batch whose column is all null can reach us as a float NaN array after Ray Data's
    Arrow round trip, so anything that is not a string is a null."""
    return pa.array([v if isinstance(v, str) else None for v in values], pa.string())


def predicted_genres(scores: np.ndarray, subsets: Sequence[str], thresholds: Callable[[str], np.ndarray],
                     genres: Sequence[str]) -> list[list[str]]:
    """Each row's genres at the thresholds tuned for the subset of signals that scored it."""
    predicted: list[list[str]] = [[] for _ in range(len(scores))]
    for subset in set(subsets):
        rows = [i for i, name in enumerate(subsets) if name == subset]
        for row, labels in zip(rows, labels_from_scores(scores[rows], thresholds(subset), genres), strict=True):
            predicted[row] = labels
    return predicted


def to_label_table(
    batch: dict[str, np.ndarray], *, genres: Sequence[str], thresholds: Callable[[str], np.ndarray],
    model_version: str, run_id: str, labelled_at: datetime,
) -> pa.Table:
    """Scores (NaN for rows that could not be scored) -> the label rows of the contract. `batch["signals"]` lists
    each row's signals; `thresholds` gives the thresholds of a subset of them ("poster+title")."""
    scores = np.asarray(batch["scores"], dtype=np.float32).reshape(len(batch["movie_id"]), len(genres))
    ok = ~np.isnan(scores).any(axis=1)
    signals = [list(used) if keep else [] for used, keep in zip(batch["signals"], ok, strict=True)]
    predicted = predicted_genres(np.nan_to_num(scores, nan=-1.0), [subset_name(s) for s in signals], thresholds,
                                 genres)
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
        "signals": pa.array(signals, pa.list_(pa.string())),
        "status": _string_array(batch["status"]),
        "error": _string_array(batch["error"]),
        "model_version": pa.array([model_version] * count, pa.string()),
        "labelled_at": pa.array([labelled_at] * count, pa.timestamp("us", tz="UTC")),
        "run_id": pa.array([run_id] * count, pa.string()),
        INPUT_KEY: _string_array(batch.get(INPUT_KEY, np.full(count, None, dtype=object))),
    }
    table = pa.table(columns, schema=labels_schema(genres))
    telemetry.count_label_rows_written(table.num_rows)  # the last step before the writer
    return table
