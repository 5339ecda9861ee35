"""Score a night's labels against the catalogue's true genres: the study's table, per-genre metrics, plots.

    python jobs/evaluate.py --labels out/labels --catalog out/sample/catalog.parquet --split test

Reads `<labels>/run_date=<date>/*.parquet` (default: the latest night) and the catalogue, joins them on
movie_id and keeps the catalogue rows of `--split` (`all`: every row). The model's F1 uses the labels' predicted
`genres` (the checkpoint's thresholds), its mAP@K the `score_<genre>` columns; the frequency prior (genre shares
of the catalogue's train rows, threshold 0.3) is scored on the same rows. Rows that cannot be scored (no label
row, a label status other than `ok`, no true genres) are counted apart in the report, never silently dropped.
Writes report.md, report.json, genre_distribution.png and per_genre_f1.png to `--out`
(default `evaluation/run_date=<date>/split=<split>`). Local paths or s3:// URIs.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

# `ray job submit --working-dir .` and plain `python jobs/...` both run from the repository root:
# make the library importable there without an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genre_pipeline import evaluation, storage  # noqa: E402
from genre_pipeline.catalog import CatalogError, read_catalog, validate_schema  # noqa: E402
from genre_pipeline.genres import DEFAULT_THRESHOLD, GENRES, UnknownGenreError, column_name, encode_many  # noqa: E402
from genre_pipeline.labels import PARTITION_KEY, STATUS_OK  # noqa: E402
from genre_pipeline.runtime import add_storage_flags, setup_logging, storage_options_from  # noqa: E402

logger = logging.getLogger("evaluate")

ALL_SPLITS = "all"
TRAIN_SPLIT = "train"  # the prior's genre shares come from these catalogue rows
LABEL_COLUMNS = ("movie_id", "genres", "status")  # plus at least one score_<genre> column
PARTITION_DIR = re.compile(rf"^{PARTITION_KEY}=(\d{{4}}-\d{{2}}-\d{{2}})$")
TRUE_GENRES, PREDICTED = "true_genres", "predicted_genres"


class EvaluationInputError(ValueError):
    """Labels or catalogue that cannot be evaluated; the message names the file, column or genre."""


@dataclass(frozen=True)
class Config:
    labels: str  # labels root holding run_date=YYYY-MM-DD/ partitions
    catalog: str
    split: str = "test"
    run_date: str | None = None  # None: the latest partition present
    out: str | None = None  # None: evaluation/run_date=<date>/split=<split>
    storage_options: storage.StorageOptions = storage.StorageOptions()


@dataclass(frozen=True)
class EvalRows:
    """The split's rows that can be scored, as arrays in the labels' genre order, and what was left out."""

    movie_ids: np.ndarray
    y_true: np.ndarray
    scores: np.ndarray
    predicted: np.ndarray
    excluded: dict  # {"no_label_row": n, "status": {status: n}, "no_true_genres": n}


def run_date_arg(text: str) -> str:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not YYYY-MM-DD")
    return text


def build_parser() -> argparse.ArgumentParser:
    defaults = Config(labels="", catalog="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", required=True, help="labels root with run_date=YYYY-MM-DD/*.parquet (local or s3://)")
    p.add_argument("--catalog", required=True, help="catalogue Parquet file or directory (local or s3://)")
    p.add_argument("--split", default=defaults.split,
                   help=f"catalogue split to evaluate; '{ALL_SPLITS}' for every row")
    p.add_argument("--run-date", type=run_date_arg, default=defaults.run_date,
                   help="labels partition YYYY-MM-DD; default: the latest present")
    p.add_argument("--out", default=defaults.out,
                   help="output directory (local or s3://); default: evaluation/run_date=<date>/split=<split>")
    add_storage_flags(p)
    return p


def parse_config(argv: list[str] | None) -> Config:
    args = build_parser().parse_args(argv)
    return Config(labels=args.labels, catalog=args.catalog, split=args.split, run_date=args.run_date,
                  out=args.out, storage_options=storage_options_from(args))


def partition_dates(labels: str, options: storage.StorageOptions) -> list[str]:
    """The run dates present under the labels root, oldest first (ISO dates sort as strings)."""
    fs, root = storage.arrow_filesystem(labels, options)
    entries = fs.get_file_info(pads.fs.FileSelector(root, allow_not_found=True))
    matches = (PARTITION_DIR.match(e.base_name) for e in entries if e.type == pads.fs.FileType.Directory)
    return sorted(m.group(1) for m in matches if m)


def resolve_run_date(config: Config) -> str:
    dates = partition_dates(config.labels, config.storage_options)
    if not dates:
        raise EvaluationInputError(f"{config.labels}: no {PARTITION_KEY}=YYYY-MM-DD partitions")
    if config.run_date is None:
        return dates[-1]
    if config.run_date not in dates:
        raise EvaluationInputError(f"{config.labels}: no partition {PARTITION_KEY}={config.run_date}; has {dates}")
    return config.run_date


def label_genres(schema: pa.Schema) -> list[str]:
    """The labels' vocabulary: the genres whose score column is present, in GENRES order."""
    return [genre for genre in GENRES if column_name(genre) in schema.names]


def read_labels(partition: str, options: storage.StorageOptions) -> tuple[pa.Table, list[str]]:
    """Every file of the partition, after checking each one has the columns evaluation needs."""
    fs, path = storage.arrow_filesystem(partition, options)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    if not dataset.files:
        raise EvaluationInputError(f"{partition}: no Parquet files in the partition")
    for fragment in dataset.get_fragments():
        schema = fragment.physical_schema
        missing = [name for name in LABEL_COLUMNS if name not in schema.names]
        if missing or not label_genres(schema):
            missing = missing or ["score_<genre> (none of them)"]
            raise EvaluationInputError(f"{fragment.path}: labels file missing required column(s) {missing}")
    genres = label_genres(dataset.schema)
    table = dataset.to_table(columns=[*LABEL_COLUMNS, "model_version", *(column_name(g) for g in genres)])
    ids = table.column("movie_id")
    if len(pc.unique(ids)) != len(ids):
        raise EvaluationInputError(f"{partition}: column 'movie_id' has duplicates; one row per movie expected")
    return table, genres


def read_eval_catalog(config: Config) -> pa.Table:
    table = read_catalog(config.catalog, config.storage_options)
    required = ["movie_id", "genres"] + ([] if config.split == ALL_SPLITS else ["split"])
    validate_schema(table.schema, source=config.catalog, required=required)
    return table


def check_catalog_genres(catalog: pa.Table, genres: list[str], source: str) -> None:
    """Every true genre must be in the labels' vocabulary, or the two sides do not describe the same task."""
    flat = pc.list_flatten(catalog.column("genres"))
    unknown = sorted(set(pc.unique(flat).to_pylist()) - set(genres))
    if unknown:
        holds = pc.list_value_length(pc.list_filter(catalog.column("genres"), lambda: None)) if False else None
        del holds
        raise EvaluationInputError(
            f"{source}: column 'genres' holds genre(s) {unknown} that the labels do not score "
            f"(their score columns cover {genres})"
        )
