"""Embed the catalogue's titles with all-MiniLM-L6-v2 (offline), as a versioned embedding table: the title signal.

Its code and --help: genre_pipeline/commands/embed_titles.py, installed as the command `genre-embed-titles`.
"""

import sys

# build_parser and parse_config too: tools read a job's command line with the parser of the script it names.
from genre_pipeline.commands.embed_titles import build_parser, main, parse_config  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
