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
import logging
import sys
from pathlib import Path

import pyarrow as pa

# `ray job submit --working-dir .` and plain `python jobs/...` both run from the repository root:
# make the library importable there without an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genre_pipeline.cli import STORAGE_FLAGS, job_parser, parse_job_args  # noqa: E402
from genre_pipeline.evaluate.report import (  # noqa: E402
    EvaluateConfig,
    EvaluationInputError,
    check_storage,
    evaluate,
    write_outputs,
)
from genre_pipeline.runtime import run_job  # noqa: E402

logger = logging.getLogger("evaluate")

EXTRA_FLAGS = STORAGE_FLAGS  # the flags that are not EvaluateConfig fields


def build_parser() -> argparse.ArgumentParser:
    return job_parser(__doc__, EvaluateConfig)


def parse_config(argv: list[str] | None) -> EvaluateConfig:
    return parse_job_args(build_parser(), EvaluateConfig, argv)[0]


def score(config: EvaluateConfig) -> tuple[str, dict[str, bytes]]:
    try:
        return evaluate(config)
    # An unreadable file or path is a bad input; writing happens only after this, so nothing is left behind.
    except (OSError, pa.ArrowInvalid) as error:
        raise EvaluationInputError(str(error)) from error


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)

    def evaluate_and_write() -> None:
        out, files = score(config)
        write_outputs(out, files, config.storage_options)
        print(files["report.md"].decode())
        logger.info("wrote %s to %s", ", ".join(files), out)

    return run_job(evaluate_and_write, logger=logger, checks=(functools.partial(check_storage, config),))


if __name__ == "__main__":
    sys.exit(main())
