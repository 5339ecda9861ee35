r"""Train a fusion model (poster + title + ratings embeddings) with Ray Train, and publish it.

    python jobs/embed_titles.py --catalog out/ml1m/catalog.parquet --out out/embeddings/title
    python jobs/embed_ratings.py --ratings ratings.dat --out out/embeddings/ratings
    python jobs/train_fusion_model.py --catalog out/ml1m/catalog.parquet --storage-path out/runs --name ml1m-fusion \
        --title-embeddings out/embeddings/title/version=<v> --ratings-embeddings out/embeddings/ratings/version=<v>

Trains on the train split's movies with genres, with or without a poster: the poster's features come from a
frozen ImageNet-pretrained backbone (from its package), the other signals from the embedding tables, and
modality dropout teaches the model to score any subset of them. Thresholds are tuned per subset of signals on
validation; the report prints each subset's metrics on the same validation movies (those with every signal).
The model is published like the poster models': `<storage-path>/<name>/versions/<model_version>/` and the
pointer `<storage-path>/<name>/model`, for the label job's --model (give it the same embedding tables).
Running a name again is refused (exit 2, naming what differs) unless its data, tables and settings are those its
checkpoint was made with, as for jobs/train_genre_model.py.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time

from genre_pipeline.cli import job_parser, parse_job_args
from genre_pipeline.data import storage
from genre_pipeline.evaluate.tables import subset_lines
from genre_pipeline.runtime import FailureMetric, run_job
from genre_pipeline.telemetry import TRAIN_JOB, push_job_outcome
from genre_pipeline.train.driver import TrainSummary, train_outcome
from genre_pipeline.train.fusion_driver import FusionJobConfig, run_fusion_training

logger = logging.getLogger("train_fusion_model")


def build_parser() -> argparse.ArgumentParser:
    return job_parser(__doc__, FusionJobConfig, pushgateway=True)


def parse_config(argv: list[str] | None) -> tuple[FusionJobConfig, argparse.Namespace]:
    return parse_job_args(build_parser(), FusionJobConfig, argv)


def check_storage(config: FusionJobConfig) -> None:
    options = config.storage_options
    storage.check_readable(config.catalog, options)
    for uri in config.tables.values():
        storage.check_readable(uri, options)
    storage.check_writable(config.storage_path, options)


def push_metrics(gateway: str | None, config: FusionJobConfig, summary: TrainSummary, seconds: float) -> None:
    push_job_outcome(gateway, job=TRAIN_JOB, run=config.name, **train_outcome(summary, seconds))


def main(argv: list[str] | None = None) -> int:
    config, args = parse_config(argv)
    started = time.monotonic()

    def train() -> None:
        summary = run_fusion_training(config)
        push_metrics(args.pushgateway, config, summary, time.monotonic() - started)
        print("\n".join(subset_lines(summary.meta.fusion["subset_metrics"], summary.meta.fusion["validation_rows"])))
        print(f"model {summary.meta.model_version} published to {summary.model_uri}")

    return run_job(train, logger=logger, checks=(functools.partial(check_storage, config),),
                   ray_needed=True, failure=FailureMetric(args.pushgateway, job=TRAIN_JOB, run=config.name,
                                                          name="train_last_failure_timestamp_seconds"))

