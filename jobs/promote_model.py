"""Promote a published model version: point `<registry>/production` at it, for the nightly label job.

Its code and --help: genre_pipeline/commands/promote_model.py, installed as the command `genre-promote`.
"""

import sys

# build_parser too: tools read a job's command line with the parser of the script it names.
from genre_pipeline.commands.promote_model import build_parser, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
