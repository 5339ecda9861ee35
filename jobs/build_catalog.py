"""Build the catalogue Parquet, from MovieLens-1M or as a generated sample.

    python jobs/build_catalog.py --movielens-dir ../shared/data/ml1m --posters ../shared/data/ml1m/posters \
        --split-file ../shared/data/ml1m/split.csv --out out/ml1m
    python jobs/build_catalog.py --sample 500 --out out/sample

`--out` is a directory (the catalogue goes to `<out>/catalog.parquet`, sample posters to `<out>/posters/`) or,
when it ends in `.parquet`, the catalogue file itself. Local paths or s3:// URIs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

# `ray job submit --working-dir .` and plain `python jobs/...` both run from the repository root:
# make the library importable there without an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genre_pipeline.data import storage  # noqa: E402
from genre_pipeline.data.catalog import (  # noqa: E402
    DEFAULT_POSTER_PATTERN,
    CatalogError,
    list_posters,
    movies_to_table,
    read_movies_dat,
    read_split_file,
    write_catalog,
)
from genre_pipeline.data.sample import POSTER_SIZE, build_sample_catalog  # noqa: E402
from genre_pipeline.runtime import add_storage_flags, setup_logging, storage_options_from  # noqa: E402

logger = logging.getLogger("build_catalog")


@dataclass(frozen=True)
class Config:
    out: str
    movielens_dir: str | None
    posters: str | None
    poster_pattern: str
    split_file: str | None
    sample: int | None
    poster_size: tuple[int, int]
    seed: int
    storage_options: storage.StorageOptions

    @property
    def catalog_uri(self) -> str:
        return self.out if self.out.endswith(".parquet") else storage.join(self.out, "catalog.parquet")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--movielens-dir", help="folder (or s3:// prefix) holding MovieLens-1M movies.dat")
    source.add_argument("--sample", type=int, metavar="N", help="generate a sample catalogue of N movies")
    parser.add_argument("--out", required=True, help="output directory or .parquet file (local or s3://)")
    parser.add_argument("--posters", help="folder or s3:// prefix of the posters (MovieLens mode)")
    parser.add_argument("--poster-pattern", default=DEFAULT_POSTER_PATTERN,
                        help="poster file name under --posters, formatted with {movie_id}")
    parser.add_argument("--split-file", help="CSV movie_id,split; default: <movielens-dir>/split.csv if present")
    parser.add_argument("--poster-size", default=f"{POSTER_SIZE[0]}x{POSTER_SIZE[1]}",
                        help="sample posters' WIDTHxHEIGHT in pixels (sample mode)")
    parser.add_argument("--seed", type=int, default=0, help="sample mode: the catalogue is a function of the seed")
    add_storage_flags(parser)
    return parser


def parse_config(argv: list[str] | None) -> Config:
    args = build_parser().parse_args(argv)
    width, height = (int(v) for v in args.poster_size.lower().split("x"))
    return Config(out=args.out, movielens_dir=args.movielens_dir, posters=args.posters,
                  poster_pattern=args.poster_pattern, split_file=args.split_file, sample=args.sample,
                  poster_size=(width, height), seed=args.seed, storage_options=storage_options_from(args))


def movielens_catalog(config: Config):
    options = config.storage_options
    movies = read_movies_dat(storage.join(config.movielens_dir, "movies.dat"), options)
    split_file = config.split_file
    if split_file is None and storage.exists(storage.join(config.movielens_dir, "split.csv"), options):
        split_file = storage.join(config.movielens_dir, "split.csv")
    splits = read_split_file(split_file, options) if split_file else None
    present = list_posters(config.posters, options) if config.posters else None
    return movies_to_table(movies, poster_location=config.posters, pattern=config.poster_pattern,
                           present=present, splits=splits)


def check_storage(config: Config) -> None:
    """Fail before writing any poster when a source cannot be read or `--out` written (endpoint, credentials,
    bucket, prefix): the message names the URI."""
    options = config.storage_options
    for source in (config.movielens_dir, config.posters):
        if source:
            storage.check_readable(source, options)
    out_dir = config.out.rsplit("/", 1)[0] if config.out.endswith(".parquet") else config.out
    storage.check_writable(out_dir, options)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(argv)
    try:
        check_storage(config)
        if config.sample is not None:
            table = build_sample_catalog(config.out.removesuffix("/catalog.parquet"), config.sample,
                                         seed=config.seed, poster_size=config.poster_size,
                                         options=config.storage_options)
        else:
            table = movielens_catalog(config)
        write_catalog(table, config.catalog_uri, config.storage_options)
    except (CatalogError, FileNotFoundError, storage.StorageError) as error:
        logger.error("%s", error)
        return 2
    with_poster = table.num_rows - table["poster_uri"].null_count
    splits = {row["values"]: row["counts"] for row in table["split"].value_counts().to_pylist()}
    print(f"wrote {config.catalog_uri}: {table.num_rows} movies, {with_poster} with a poster, splits {splits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
