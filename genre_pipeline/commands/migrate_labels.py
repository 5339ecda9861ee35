r"""Move the labels of the old Hive-partitioned layout (`<root>/run_date=YYYY-MM-DD/*.parquet`) into the labels
table, one snapshot tagged night-<date> per night, oldest first.

    python jobs/migrate_labels.py --from out/labels --output out/labels

    python jobs/migrate_labels.py --from s3://bucket/labels --output s3://bucket/warehouse --table-catalog prod

`--output`, `--table-catalog` and `--table` are the label job's. Nights the table already has are skipped, so a
re-run migrates nothing twice. Exit 0 when every night left to migrate was committed; 2 when a night cannot be
(a repeated or null movie_id, a column the table lacks, no nights), when a night to migrate is older than the
table's latest night (it would become the table's current night), or when a label run committed meanwhile. The
migrated rows have no input_key, so the next label night scores every movie again.
"""

from __future__ import annotations

import argparse
import logging

from genre_pipeline.cli import job_parser, parse_job_args
from genre_pipeline.label.migrate import MigrateConfig, MigrationSummary, migrate_labels
from genre_pipeline.runtime import run_job

logger = logging.getLogger("migrate_labels")


def build_parser() -> argparse.ArgumentParser:
    return job_parser(__doc__, MigrateConfig)


def parse_config(argv: list[str] | None) -> tuple[MigrateConfig, argparse.Namespace]:
    return parse_job_args(build_parser(), MigrateConfig, argv)


def print_summary(summary: MigrationSummary) -> None:
    for night in summary.migrated:
        print(f"migrated night {night.run_date}: {night.rows} rows, snapshot {night.snapshot_id}")
    if summary.skipped:
        print(f"already in the table, skipped: {', '.join(summary.skipped)}")
    print(f"{len(summary.migrated)} nights migrated into {summary.table}")


def main(argv: list[str] | None = None) -> int:
    config, _ = parse_config(argv)
    return run_job(lambda: print_summary(migrate_labels(config)), logger=logger)

