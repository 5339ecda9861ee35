"""Fine-tune a genre model on the catalogue's train split with Ray Train, and publish the best checkpoint.

Its code and --help: genre_pipeline/commands/train_genre_model.py, installed as the command `genre-train`.
"""

import sys

# build_parser and parse_config too: tools read a job's command line with the parser of the script it names.
from genre_pipeline.commands.train_genre_model import build_parser, main, parse_config  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
