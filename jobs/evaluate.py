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
import logging
import re
import sys
from pathlib import Path

import pyarrow as pa

# `ray job submit --working-dir .` and plain `python jobs/...` both run from the repository root:
# make the library importable there without an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genre_pipeline.data import storage  # noqa: E402
from genre_pipeline.data.catalog import CatalogError  # noqa: E402
from genre_pipeline.evaluate.report import (  # noqa: E402
    ALL_SPLITS,
    VALIDATION_SPLIT,
    EvaluateConfig,
    EvaluationInputError,
    check_storage,
    evaluate,
    write_outputs,
)
from genre_pipeline.runtime import add_storage_flags, setup_logging, storage_options_from  # noqa: E402

logger = logging.getLogger("evaluate")


def run_date_arg(text: str) -> str:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not YYYY-MM-DD")
    return text


def build_parser() -> argparse.ArgumentParser:
    defaults = EvaluateConfig(labels="", catalog="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", required=True, help="labels root with run_date=YYYY-MM-DD/*.parquet (local or s3://)")
    p.add_argument("--catalog", required=True, help="catalogue Parquet file or directory (local or s3://)")
    p.add_argument("--split", default=defaults.split,
                   help=f"catalogue split to evaluate; '{ALL_SPLITS}' for every row")
    p.add_argument("--run-date", type=run_date_arg, default=defaults.run_date,
                   help="labels partition YYYY-MM-DD; default: the latest present")
    p.add_argument("--out", default=defaults.out,
                   help="output directory (local or s3://); default: evaluation/run_date=<date>/split=<split>")
    p.add_argument("--val-fraction", type=float, default=None,
                   help=f"the training job's --val-fraction: its held-out train rows become split "
                        f"'{VALIDATION_SPLIT}' (evaluate with --split {VALIDATION_SPLIT}); the prior then comes "
                        "from the remaining train rows")
    p.add_argument("--model", default=None,
                   help="the checkpoint that wrote these labels (local or s3://): the report then shows its "
                        "backbone, initial weights, preprocessing, thresholds and recipe")
    add_storage_flags(p)
    return p


def parse_config(argv: list[str] | None) -> EvaluateConfig:
    args = build_parser().parse_args(argv)
    return EvaluateConfig(labels=args.labels, catalog=args.catalog, split=args.split, run_date=args.run_date,
                          out=args.out, val_fraction=args.val_fraction, model=args.model,
                          storage_options=storage_options_from(args))


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(argv)
    try:
        check_storage(config)
        out, files = evaluate(config)
    # OSError/ArrowInvalid: an unreadable file or path; writing happens only after this, so nothing is left behind.
    except (EvaluationInputError, CatalogError, storage.StorageError, OSError, pa.ArrowInvalid) as error:
        logger.error("%s", error)
        return 2
    try:
        write_outputs(out, files, config.storage_options)
    except storage.StorageError as error:
        logger.error("%s", error)
        return 2
    print(files["report.md"].decode())
    logger.info("wrote %s to %s", ", ".join(files), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
