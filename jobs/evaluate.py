"""Score a night's labels against the catalogue's true genres: the study's table, per-genre metrics, plots.

Its code and --help: genre_pipeline/commands/evaluate.py, installed as the command `genre-evaluate`.
"""

import sys

# build_parser and parse_config too: tools read a job's command line with the parser of the script it names.
from genre_pipeline.commands.evaluate import build_parser, main, parse_config  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
