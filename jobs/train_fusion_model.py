"""Train a fusion model (poster + title + ratings embeddings) with Ray Train, and publish it.

Its code and --help: genre_pipeline/commands/train_fusion_model.py, installed as the command `genre-train-fusion`.
"""

import sys

# build_parser and parse_config too: tools read a job's command line with the parser of the script it names.
from genre_pipeline.commands.train_fusion_model import build_parser, main, parse_config  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
