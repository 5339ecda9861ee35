r"""Label every movie of the catalogue with genres from its poster: the nightly Ray Data job.

    python jobs/label_catalog.py --catalog out/sample/catalog.parquet --model out/runs/demo-cnn/model \
        --output out/labels --run-date 2026-11-28

    ray job submit --working-dir . -- python jobs/label_catalog.py --catalog s3://bucket/catalog.parquet \
        --model s3://bucket/runs/genre-resnet50/model --output s3://bucket/labels --actors 4 --num-gpus-per-actor 1

Commits the night to the Iceberg table `--table` (default genre_pipeline.labels, in an embedded SQLite catalog
under `--output`) as one snapshot tagged night-<date>: one row per catalogue movie (bad posters included, with a
status). Only movies whose inputs changed since the last night are scored; the others keep their rows.
Exit 0 when the night was committed (bad posters included); 2 when nothing was committed: the catalogue, the
model or the output cannot be used, more than --max-failed-fraction of the posters failed, the night would drop
more than --max-shrink-fraction of the last night's movies, or another run committed meanwhile. The table then
keeps its last night.
"""

from __future__ import annotations

import argparse
import logging
import time

from genre_pipeline.cli import job_parser, parse_job_args
from genre_pipeline.label.night import LabelSummary, label_catalog
from genre_pipeline.label.origins import ORIGINS
from genre_pipeline.label.pipeline import LabelConfig
from genre_pipeline.runtime import FailureMetric, run_job
from genre_pipeline.statuses import STATUSES
from genre_pipeline.telemetry import LABEL_JOB, LabelledGauge, push_job_outcome

logger = logging.getLogger("label_catalog")


def build_parser() -> argparse.ArgumentParser:
    return job_parser(__doc__, LabelConfig, pushgateway=True)


def parse_config(argv: list[str] | None) -> tuple[LabelConfig, argparse.Namespace]:
    return parse_job_args(build_parser(), LabelConfig, argv)


def push_metrics(gateway: str | None, config: LabelConfig, summary: LabelSummary) -> None:
    """The night's outcome, grouped by {job, run=run date}: a re-run of the night replaces it."""
    # Every status gets a series, zeros included: a dashboard or alert then sees 0, not "no data".
    rows = {status: 0.0 for status in STATUSES} | {s: float(n) for s, n in summary.rows_by_status.items()}
    push_job_outcome(
        gateway, job=LABEL_JOB, run=config.run_date,
        gauges={
            "label_duration_seconds": (summary.seconds, "Wall time of the label run"),
            "label_posters_per_second": (summary.posters_per_second, "Movies scored tonight per second"),
            "label_setup_seconds": (summary.setup_seconds, "Fixed start-up of the label run"),
            "label_removed_rows": (float(summary.removed), "Movies of the last night that left the catalogue"),
            "label_last_success_timestamp_seconds": (time.time(), "Unix time the label run succeeded"),
        },
        labelled={
            "label_rows": LabelledGauge("Rows committed by the label run, by status", "status", rows),
            "label_rows_by_origin": LabelledGauge("Rows committed by the label run, by where they came from "
                                                  "(scored, resumed, carried)", "origin",
                                                  {o: float(summary.rows_by_origin.get(o, 0)) for o in ORIGINS}),
            "model_info": LabelledGauge("The model that made the labels (always 1)", "model_version",
                                        {summary.model_version: 1.0}),
        },
    )


def print_summary(summary: LabelSummary) -> None:
    by_status = ", ".join(f"{status}={count}" for status, count in sorted(summary.rows_by_status.items()))
    by_origin = ", ".join(f"{origin} {summary.rows_by_origin.get(origin, 0)}" for origin in ORIGINS)
    print(f"labelled {summary.rows} movies in {summary.seconds:.1f}s ({by_status}); {by_origin}, "
          f"removed {summary.removed}; {summary.posters_per_second:.1f} posters/s scored; "
          f"start-up {summary.setup_seconds:.1f}s; model {summary.model_version}")
    print(f"committed snapshot {summary.snapshot_id} of table {summary.table}")


def main(argv: list[str] | None = None) -> int:
    config, args = parse_config(argv)

    def label() -> None:
        summary = label_catalog(config)
        print_summary(summary)
        push_metrics(args.pushgateway, config, summary)

    return run_job(label, logger=logger, ray_needed=True, failure=FailureMetric(
        args.pushgateway, job=LABEL_JOB, run=config.run_date, name="label_last_failure_timestamp_seconds"))

