"""Score a night's labels against the catalogue's true genres: the study's table, per-genre metrics, plots.

    python jobs/evaluate.py --labels out/labels --catalog out/sample/catalog.parquet --split test
    python jobs/evaluate.py --labels s3://bucket/labels --table-catalog shared --run-date 2024-05-01 \\
        --catalog s3://bucket/catalog.parquet

Reads one night of the label job's Iceberg table (`--labels`, `--table-catalog` and `--table` as the label
job was given them, a named catalog configured by the same PYICEBERG_CATALOG__<NAME>__* variables; `--run-date`
picks the snapshot tagged night-<date>, default the table's current one) and the catalogue, joins them on
movie_id and keeps the catalogue rows of `--split` (`all`: every row). The model's F1 uses the labels' predicted
`genres` (the checkpoint's thresholds), its mAP@K the `score_<genre>` columns; the frequency prior (genre shares
of the catalogue's train rows, threshold 0.3) is scored on the same rows. Rows that cannot be scored (no label
row, a label status other than `ok`, no true genres) are counted apart in the report, never silently dropped.
Writes report.md, report.json, genre_distribution.png and per_genre_f1.png to `--out`
(default `evaluation/run_date=<date>/split=<split>`). Local paths or s3:// URIs.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging

import pyarrow as pa

from genre_pipeline.cli import job_parser, parse_job_args
from genre_pipeline.evaluate.evaluation import (
    EvaluateConfig,
    EvaluationReport,
    check_storage,
    evaluate_night,
    output_folder,
    write_outputs,
)
from genre_pipeline.evaluate.night_labels import EvaluationInputError
from genre_pipeline.evaluate.plots import evaluation_figures
from genre_pipeline.evaluate.tables import render_report
from genre_pipeline.runtime import run_job

logger = logging.getLogger("evaluate")


def build_parser() -> argparse.ArgumentParser:
    return job_parser(__doc__, EvaluateConfig)


def parse_config(argv: list[str] | None) -> EvaluateConfig:
    return parse_job_args(build_parser(), EvaluateConfig, argv)[0]


def score(config: EvaluateConfig) -> EvaluationReport:
    try:
        return evaluate_night(config)
    # An unreadable file or path is a bad input; writing happens only after this, so nothing is left behind.
    except (OSError, pa.ArrowInvalid) as error:
        raise EvaluationInputError(str(error)) from error


def report_files(report: EvaluationReport) -> dict[str, bytes]:
    """What the job writes, rendered in memory: report.md, report.json and the figures."""
    return {"report.md": render_report(report).encode(),
            "report.json": json.dumps(report.to_json(), indent=2, allow_nan=False).encode(),
            **evaluation_figures(report)}


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)

    def evaluate_and_write() -> None:
        report = score(config)
        out, files = output_folder(config, report), report_files(report)
        write_outputs(out, files, config.storage_options)
        print(files["report.md"].decode())
        logger.info("wrote %s to %s", ", ".join(files), out)

    return run_job(evaluate_and_write, logger=logger, checks=(functools.partial(check_storage, config),))
