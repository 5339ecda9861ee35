r"""Turn a ratings table into a per-movie "ratings embedding": who rated a movie, as a vector, for the fusion model.

    python jobs/embed_ratings.py --ratings ../shared/data/ml1m/ratings_partial.dat.gz --out out/embeddings/ratings

    ray job submit --working-dir . -- python jobs/embed_ratings.py --ratings s3://bucket/ratings/ \
        --out s3://bucket/embeddings/ratings --dim 64

Reads Parquet (user_id, movie_id, rating) or MovieLens `ratings.dat[.gz]` with Ray Data, factorises the implicit
user x movie matrix by a randomized SVD in streaming passes (genre_pipeline/signals/ratings.py) and writes
`<out>/version=<v>/embeddings.parquet` (genre_pipeline/signals/embeddings.py: read it back with
`read_embeddings`). The version is a digest of the inputs' names, sizes and dates and of the parameters: a re-run on
the same input replaces the same version. Exit 0 when written; 2 when the ratings cannot be used (missing,
malformed: the message names the file and the line or column) or a setting is out of range.
"""

from __future__ import annotations

import argparse
import logging

from genre_pipeline.cli import job_parser, parse_job_args
from genre_pipeline.runtime import run_job
from genre_pipeline.signals.ratings import RatingsConfig, embed_ratings

logger = logging.getLogger("embed_ratings")


def build_parser() -> argparse.ArgumentParser:
    return job_parser(__doc__, RatingsConfig)


def parse_config(argv: list[str] | None) -> RatingsConfig:
    return parse_job_args(build_parser(), RatingsConfig, argv)[0]


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)

    def body() -> None:
        summary = embed_ratings(config)
        print(f"embedded {summary.rows} movies ({summary.movies} rated, {summary.ratings} ratings, "
              f"{summary.users} users) in {summary.seconds:.1f}s")
        print(f"output: {summary.version_uri}")

    return run_job(body, logger=logger, ray_needed=True)

