r"""Build the catalogue Parquet, from MovieLens-1M or as a generated sample.

    python jobs/build_catalog.py --movielens-dir ../shared/data/ml1m --posters ../shared/data/ml1m/posters \
        --split-file ../shared/data/ml1m/split.csv --out out/ml1m
    python jobs/build_catalog.py --sample 500 --out out/sample

`--out` is a directory (the catalogue goes to `<out>/catalog.parquet`, sample posters to `<out>/posters/`) or,
when it ends in `.parquet`, the catalogue file itself. Local paths or s3:// URIs.
"""

from __future__ import annotations

import argparse
import functools
import logging
from dataclasses import dataclass, field

from genre_pipeline.cli import job_parser, parse_job_args
from genre_pipeline.config_fields import check_fields, option
from genre_pipeline.data import storage
from genre_pipeline.data.catalog import (
    DEFAULT_POSTER_PATTERN,
    list_posters,
    movies_to_table,
    read_movies_dat,
    read_split_file,
    write_catalog,
)
from genre_pipeline.data.sample import POSTER_SIZE, build_sample_catalog
from genre_pipeline.runtime import run_job

logger = logging.getLogger("build_catalog")


def pixel_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT")
    return int(width), int(height)


@dataclass(frozen=True, kw_only=True)  # keyword-only: the required --out can follow the sources, as in --help
class CatalogConfig:
    """The catalogue job's settings; each field's metadata is its flag. One of the two sources is required."""

    movielens_dir: str | None = field(default=None, metadata=option(
        "folder (or s3:// prefix) holding MovieLens-1M movies.dat"))
    sample: int | None = field(default=None, metadata=option(
        "generate a sample catalogue of N movies", metavar="N"))
    out: str = field(metadata=option("output directory or .parquet file (local or s3://)"))
    posters: str | None = field(default=None, metadata=option(
        "folder or s3:// prefix of the posters (MovieLens mode)"))
    poster_pattern: str = field(default=DEFAULT_POSTER_PATTERN, metadata=option(
        "poster file name under --posters, formatted with {movie_id}"))
    split_file: str | None = field(default=None, metadata=option(
        "CSV movie_id,split; default: <movielens-dir>/split.csv if present"))
    poster_size: tuple[int, int] = field(default=POSTER_SIZE, metadata=option(
        "sample posters' WIDTHxHEIGHT in pixels (sample mode)", type=pixel_size))
    seed: int = field(default=0, metadata=option("sample mode: the catalogue is a function of the seed"))
    storage_options: storage.StorageOptions = field(default_factory=storage.StorageOptions)  # the storage flags'

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def catalog_uri(self) -> str:
        return self.out if self.out.endswith(".parquet") else storage.join(self.out, "catalog.parquet")



def build_parser() -> argparse.ArgumentParser:
    return job_parser(__doc__, CatalogConfig, one_of=("movielens_dir", "sample"))


def parse_config(argv: list[str] | None) -> CatalogConfig:
    return parse_job_args(build_parser(), CatalogConfig, argv)[0]


def movielens_catalog(config: CatalogConfig):
    options = config.storage_options
    movies = read_movies_dat(storage.join(config.movielens_dir, "movies.dat"), options)
    split_file = config.split_file
    if split_file is None and storage.exists(storage.join(config.movielens_dir, "split.csv"), options):
        split_file = storage.join(config.movielens_dir, "split.csv")
    splits = read_split_file(split_file, options) if split_file else None
    present = list_posters(config.posters, options) if config.posters else None
    return movies_to_table(movies, poster_location=config.posters, pattern=config.poster_pattern,
                           present=present, splits=splits)


def check_storage(config: CatalogConfig) -> None:
    """Fail before writing any poster when a source cannot be read or `--out` written (endpoint, credentials,
    bucket, prefix): the message names the URI."""
    options = config.storage_options
    for source in (config.movielens_dir, config.posters):
        if source:
            storage.check_readable(source, options)
    out_dir = config.out.rsplit("/", 1)[0] if config.out.endswith(".parquet") else config.out
    storage.check_writable(out_dir, options)


def build(config: CatalogConfig) -> None:
    if config.sample is not None:
        table = build_sample_catalog(config.out.removesuffix("/catalog.parquet"), config.sample, seed=config.seed,
                                     poster_size=config.poster_size, options=config.storage_options)
    else:
        table = movielens_catalog(config)
    write_catalog(table, config.catalog_uri, config.storage_options)
    with_poster = table.num_rows - table["poster_uri"].null_count
    splits = {row["values"]: row["counts"] for row in table["split"].value_counts().to_pylist()}
    print(f"wrote {config.catalog_uri}: {table.num_rows} movies, {with_poster} with a poster, splits {splits}")


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    return run_job(functools.partial(build, config), logger=logger, checks=(functools.partial(check_storage, config),))

