"""Build the catalogue Parquet, from MovieLens-1M or as a generated sample.

Its code and --help: genre_pipeline/commands/build_catalog.py, installed as the command `genre-build-catalog`.
"""

import sys

# build_parser and parse_config too: tools read a job's command line with the parser of the script it names.
from genre_pipeline.commands.build_catalog import build_parser, main, parse_config  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
