"""The "ratings" signal's job: who rated a movie, as a per-movie embedding, written as one embeddings version.

    ratings files (ratings_files.py) -> one row per user -> randomized SVD passes (ratings_svd.py) -> write_embeddings

Movies with fewer than `min_ratings` ratings (none at all included) get no row: "no ratings signal". The result
is a function of the input and the parameters (seed included), up to float rounding: partial sums arrive in any
order (tests compare runs at 1e-6).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from genre_pipeline.config_fields import AT_LEAST_1, NON_NEGATIVE, check_fields, option
from genre_pipeline.data import storage
from genre_pipeline.signals.embeddings import EmbeddingMeta, write_embeddings
from genre_pipeline.signals.ratings_files import fingerprint, list_inputs, read_ratings
from genre_pipeline.signals.ratings_svd import WEIGHTINGS, by_user, factorise, movie_embedding

logger = logging.getLogger(__name__)

METHOD = "randomized SVD of the implicit user x movie matrix"


@dataclass(frozen=True)
class RatingsConfig:
    """The ratings embedding job's settings; each field's metadata is its flag in jobs/embed_ratings.py."""

    ratings: str = field(metadata=option(
        "ratings file or folder (local or s3://): *.parquet (user_id, movie_id, rating) or MovieLens *.dat[.gz]"))
    out: str = field(metadata=option("embeddings root; the run goes to <out>/version=<v>/embeddings.parquet"))
    dim: int = field(default=64, metadata=option("embedding dimension (default 64)", check=AT_LEAST_1))
    oversampling: int = field(default=16, metadata=option(
        "extra random directions of the randomized SVD, for accuracy (default 16)", check=NON_NEGATIVE))
    power_iterations: int = field(default=1, metadata=option(
        "power iterations (one more pass over the ratings each; default 1)", check=NON_NEGATIVE))
    min_ratings: int = field(default=1, metadata=option(
        "movies with fewer ratings get no row (default 1)", check=AT_LEAST_1))
    weighting: str = field(default="binary", metadata=option(
        "binary: every rating counts 1; inverse_sqrt: a user's ratings count 1/sqrt(its number of ratings)",
        choices=WEIGHTINGS))
    seed: int = field(default=0, metadata=option("seed of the random projection (default 0)"))
    storage_options: storage.StorageOptions = storage.StorageOptions()

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def params(self) -> dict:
        return {"oversampling": self.oversampling, "power_iterations": self.power_iterations,
                "min_ratings": self.min_ratings, "weighting": self.weighting, "seed": self.seed,
                "scaling": "U*sqrt(s), rows L2-normalised"}


@dataclass(frozen=True)
class RatingsSummary:
    version_uri: str
    rows: int  # movies embedded
    movies: int  # movies with at least one rating
    ratings: int
    users: int
    seconds: float


def embed_ratings(config: RatingsConfig) -> RatingsSummary:
    """Read, factorise, write one version under `config.out`."""
    start = time.monotonic()
    file_format, entries = list_inputs(config.ratings, config.storage_options)
    meta_params = {**config.params, "dim": config.dim}
    source_fingerprint = fingerprint(entries, meta_params)
    input_bytes = sum(int(entry.get("size") or 0) for entry in entries)
    users = by_user(read_ratings(config.ratings, file_format, entries, config.storage_options), input_bytes)
    movie_ids, counts, u, s = factorise(
        users, dim=config.dim, oversampling=config.oversampling, power_iterations=config.power_iterations,
        seed=config.seed, weighting=config.weighting)
    keep = counts >= config.min_ratings
    vectors = movie_embedding(u, s, config.dim)[keep]
    meta = EmbeddingMeta(signal="ratings", dim=config.dim, method=METHOD, params=config.params,
                         source=config.ratings, source_fingerprint=source_fingerprint, rows=int(keep.sum()))
    folder = write_embeddings(config.out, movie_ids[keep], vectors, meta, config.storage_options)
    return RatingsSummary(folder, int(keep.sum()), len(movie_ids), int(counts.sum()), users.count(),
                          time.monotonic() - start)
