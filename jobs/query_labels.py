"""Query the labels table with SQL (DuckDB), as a warehouse would.

Its code and --help: genre_pipeline/commands/query_labels.py, installed as the command `genre-query-labels`.
"""

import sys

# build_parser too: tools read a job's command line with the parser of the script it names.
from genre_pipeline.commands.query_labels import build_parser, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
