"""Move the labels of the old Hive-partitioned layout (`<root>/run_date=YYYY-MM-DD/*.parquet`) into the labels
table, one snapshot tagged night-<date> per night, oldest first.

Its code and --help: genre_pipeline/commands/migrate_labels.py, installed as the command `genre-migrate-labels`.
"""

import sys

# build_parser and parse_config too: tools read a job's command line with the parser of the script it names.
from genre_pipeline.commands.migrate_labels import build_parser, main, parse_config  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
