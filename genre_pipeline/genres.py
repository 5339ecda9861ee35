"""The 18-genre vocabulary of MovieLens-1M, multi-hot encoding, and scores -> labels."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from genre_pipeline.errors import JobInputError

# ML-1M's own order (its README): the column order of every score matrix in this project.
GENRES: tuple[str, ...] = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)

# The study's single threshold; also the fallback for genres too rare to tune on validation.
DEFAULT_THRESHOLD = 0.3


class UnknownGenreError(JobInputError, ValueError):
    """A genre name that is not in the vocabulary in use."""


def column_name(genre: str) -> str:
    """`Children's` -> `score_childrens`, `Film-Noir` -> `score_film_noir`: SQL-friendly names."""
    slug = re.sub(r"[^a-z0-9]+", "_", genre.lower().replace("'", "")).strip("_")
    return f"score_{slug}"


def score_columns(genres: Sequence[str] = GENRES) -> list[str]:
    return [column_name(g) for g in genres]


def encode(labels: Iterable[str] | None, genres: Sequence[str] = GENRES) -> np.ndarray:
    """Multi-hot float32 vector; raises UnknownGenreError naming the genre that is not in `genres`."""
    index = {g: i for i, g in enumerate(genres)}
    vector = np.zeros(len(genres), dtype=np.float32)
    for label in () if labels is None else labels:  # also numpy arrays, as Ray Data hands list columns
        if label not in index:
            raise UnknownGenreError(f"genre {label!r} is not one of {list(genres)}")
        vector[index[label]] = 1.0
    return vector


def encode_many(rows: Iterable[Iterable[str] | None], genres: Sequence[str] = GENRES) -> np.ndarray:
    vectors = [encode(row, genres) for row in rows]
    return np.stack(vectors) if vectors else np.zeros((0, len(genres)), dtype=np.float32)


def labels_from_scores(
    scores: np.ndarray, thresholds: np.ndarray, genres: Sequence[str] = GENRES
) -> list[list[str]]:
    """Genres whose score reaches its threshold, per row; an empty list when none does."""
    predicted = np.asarray(scores) >= np.asarray(thresholds)[None, :]
    return [[genres[i] for i in np.flatnonzero(row)] for row in predicted]


def top_genres(scores: np.ndarray, genres: Sequence[str] = GENRES) -> list[str]:
    return [genres[i] for i in np.argmax(np.asarray(scores), axis=1)]
