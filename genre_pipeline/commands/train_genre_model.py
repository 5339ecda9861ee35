r"""Fine-tune a genre model on the catalogue's train split with Ray Train, and publish the best checkpoint.

    python jobs/train_genre_model.py --catalog out/ml1m/catalog.parquet --num-workers 2 --cpus-per-worker 0.5 \
        --storage-path out/runs --name ml1m-lite0

The defaults are the recipe for real posters: an ImageNet-pretrained EfficientNet-Lite0 (weights from an
installed package, no network), its head trained first on cached features of the frozen backbone, then the
whole network for --epochs with the backbone at a quarter of the LR; thresholds tuned for micro-F1 on validation.
From scratch instead: `--arch cnn --head-epochs 0 --epochs 20 --lr 1e-3`.

Checkpoints go to `<storage-path>/<name>/` (Ray Train's layout); the best epoch (validation mAP@3) is copied
to `<storage-path>/<name>/model`, the URI to give the label job. Running the same command again resumes
from the latest checkpoint. Add `--use-gpu` on a GPU cluster.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time

from genre_pipeline.cli import job_parser, parse_job_args
from genre_pipeline.data import storage
from genre_pipeline.evaluate.metrics import metrics_line
from genre_pipeline.runtime import FailureMetric, run_job
from genre_pipeline.telemetry import TRAIN_JOB, push_job_outcome
from genre_pipeline.train.driver import TrainJobConfig, TrainSummary, run_training, train_outcome

logger = logging.getLogger("train_genre_model")


def build_parser() -> argparse.ArgumentParser:
    return job_parser(__doc__, TrainJobConfig, pushgateway=True)


def parse_config(argv: list[str] | None) -> tuple[TrainJobConfig, argparse.Namespace]:
    return parse_job_args(build_parser(), TrainJobConfig, argv)


def check_storage(config: TrainJobConfig) -> None:
    """Fail before Ray starts when the catalogue (or weights file) cannot be read or the storage path written:
    a wrong endpoint, credential, bucket or prefix then costs seconds, with a message naming the URI."""
    options = config.storage_options
    storage.check_readable(config.catalog, options)
    if config.weights:
        storage.check_readable(config.weights, options)
    storage.check_writable(config.storage_path, options)


def push_metrics(gateway: str | None, config: TrainJobConfig, summary: TrainSummary, seconds: float) -> None:
    """The published model's validation metrics, grouped by {job, run=run name}: a resumed run replaces them."""
    push_job_outcome(gateway, job=TRAIN_JOB, run=config.name, **train_outcome(summary, seconds))


def main(argv: list[str] | None = None) -> int:
    config, args = parse_config(argv)
    started = time.monotonic()

    def train() -> None:
        summary = run_training(config)
        push_metrics(args.pushgateway, config, summary, time.monotonic() - started)
        print(f"best epoch {summary.meta.epoch} of {summary.epochs_run}: {metrics_line(summary.meta.metrics)}")
        print(f"model {summary.meta.model_version} published to {summary.model_uri}")

    return run_job(train, logger=logger, checks=(functools.partial(check_storage, config),),
                   ray_needed=True, failure=FailureMetric(args.pushgateway, job=TRAIN_JOB, run=config.name,
                                                          name="train_last_failure_timestamp_seconds"))

