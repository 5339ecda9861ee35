"""Turn a ratings table into a per-movie "ratings embedding": who rated a movie, as a vector, for the fusion model.

Its code and --help: genre_pipeline/commands/embed_ratings.py, installed as the command `genre-embed-ratings`.
"""

import sys

# build_parser and parse_config too: tools read a job's command line with the parser of the script it names.
from genre_pipeline.commands.embed_ratings import build_parser, main, parse_config  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
