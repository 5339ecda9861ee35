"""Label every movie of the catalogue with genres from its poster: the nightly Ray Data job.

Its code and --help: genre_pipeline/commands/label_catalog.py, installed as the command `genre-label`.
"""

import sys

# build_parser and parse_config too: tools read a job's command line with the parser of the script it names.
from genre_pipeline.commands.label_catalog import build_parser, main, parse_config  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
