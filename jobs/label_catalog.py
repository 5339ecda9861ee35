"""Label every movie of the catalogue with genres from its poster: the nightly Ray Data job.

    python jobs/label_catalog.py --catalog out/sample/catalog.parquet --model out/runs/demo-cnn/model \
        --output out/labels --run-date 2026-11-28

    ray job submit --working-dir . -- python jobs/label_catalog.py --catalog s3://bucket/catalog.parquet \
        --model s3://bucket/runs/genre-resnet50/model --output s3://bucket/labels --actors 4 --num-gpus-per-actor 1

Writes `<output>/run_date=<date>/labels.parquet`, one row per catalogue movie (bad posters included, with a
status), replacing an earlier run of the same night in one atomic step once the new one is complete.
Exit 0 when the night was committed (bad posters included); 2 when nothing was committed: the catalogue, the
model or the output cannot be used, more than --max-failed-fraction of the posters failed, or another run
committed the night meanwhile. The previous labels of the night then stay as they were.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import date, datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # importable from the repo root, no install needed

from genre_pipeline.data.catalog import CatalogError  # noqa: E402
from genre_pipeline.data.storage import StorageError  # noqa: E402
from genre_pipeline.label.commit import NightChangedError, OutputIncompleteError  # noqa: E402
from genre_pipeline.label.contract import STATUSES  # noqa: E402
from genre_pipeline.label.pipeline import (  # noqa: E402
    DEFAULT_BATCH_SIZE,
    IO_CPU_RESERVE,
    ActorResourcesError,
    FailedNightError,
    LabelConfig,
    LabelSummary,
    label_catalog,
)
from genre_pipeline.model.checkpoints import CheckpointError  # noqa: E402
from genre_pipeline.model.predictor import PRECISIONS  # noqa: E402
from genre_pipeline.runtime import add_storage_flags, init_ray, setup_logging, storage_options_from  # noqa: E402
from genre_pipeline.telemetry import LABEL_JOB, LabelledGauge, push_job_failure, push_job_outcome  # noqa: E402

logger = logging.getLogger("label_catalog")


def run_date(text: str) -> str:
    return date.fromisoformat(text).isoformat()


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = LabelConfig(catalog="", model="", output="", run_date="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalog", required=True, help="catalogue Parquet file or directory (local or s3://)")
    p.add_argument("--model", required=True,
                   help="checkpoint directory, or a published model folder (<storage-path>/<name>/model) whose "
                        "pointer names a version; resolved once per run and its weights digest-checked")
    p.add_argument("--output", required=True, help="labels root; the night goes to <output>/run_date=<date>/")
    p.add_argument("--run-date", type=run_date, default=datetime.now(timezone.utc).date().isoformat(),
                   help="YYYY-MM-DD partition to (re)write; default: today in UTC")
    p.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                   help=f"images per forward pass; default {DEFAULT_BATCH_SIZE['cpu']} on CPU, "
                        f"{DEFAULT_BATCH_SIZE['cuda']} on GPU (lower it if the card runs out of memory)")
    p.add_argument("--actors", type=positive_int, default=defaults.actors,
                   help="PosterLabeller actors (model replicas); default on CPU: one per core of the cluster's "
                        "nodes, single-threaded; with GPUs: the cluster's GPUs over --num-gpus-per-actor")
    p.add_argument("--num-gpus-per-actor", type=non_negative_float, default=defaults.num_gpus_per_actor,
                   help="GPUs per actor; 0 scores on CPU")
    p.add_argument("--cpus-per-actor", type=positive_float, default=defaults.cpus_per_actor,
                   help="CPUs Ray reserves per actor; default 1 with GPUs, else the node's CPUs less "
                        f"{IO_CPU_RESERVE:g} for Ray Data's read tasks, shared by the node's actors")
    p.add_argument("--threads-per-actor", type=positive_int, default=defaults.threads_per_actor,
                   help="intra-op (and decode) threads per actor; default on CPU: the node's cores shared by its "
                        "actors (1 with the default --actors), with GPUs: the actor's CPUs")
    p.add_argument("--precision", choices=PRECISIONS, default=defaults.precision,
                   help="auto: bf16 autocast on GPUs, fp32 on CPUs; bf16 on CPUs is faster on AVX512-BF16 cores "
                        "(1.8x for resnet50) and moves scores slightly: compare two nights with evaluate.py")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in each actor (GPU runs)")
    p.add_argument("--poster-root", action="append", default=[], dest="poster_roots", metavar="ROOT",
                   help="a local folder or s3://bucket/prefix posters may be read from (repeatable); a poster "
                        "elsewhere, after following symlinks and '..', gets status refused_poster. Default: the "
                        "folder or prefix the catalogue lies in")
    p.add_argument("--max-poster-bytes", type=positive_int, default=defaults.max_poster_bytes,
                   help=f"larger posters get status refused_poster (default {defaults.max_poster_bytes:,})")
    p.add_argument("--max-failed-fraction", type=fraction, default=defaults.max_failed_fraction,
                   help="when more than this fraction of the rows with a poster_uri fail (fetch, decode, refusal, "
                        "scoring), nothing is committed and the job exits 2: a systemic fault, not bad posters "
                        f"(default {defaults.max_failed_fraction:g})")
    p.add_argument("--pushgateway", default=None, help="HOST:PORT of a Prometheus Pushgateway")
    add_storage_flags(p)
    return p


def parse_config(argv: list[str] | None) -> tuple[LabelConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    config = LabelConfig(catalog=args.catalog, model=args.model, output=args.output, run_date=args.run_date,
                         batch_size=args.batch_size, actors=args.actors, num_gpus_per_actor=args.num_gpus_per_actor,
                         cpus_per_actor=args.cpus_per_actor, threads_per_actor=args.threads_per_actor,
                         precision=args.precision, compile_model=args.compile,
                         poster_roots=tuple(args.poster_roots), max_poster_bytes=args.max_poster_bytes,
                         max_failed_fraction=args.max_failed_fraction, storage_options=storage_options_from(args))
    return config, args


def push_metrics(gateway: str | None, config: LabelConfig, summary: LabelSummary) -> None:
    """The night's outcome, grouped by {job, run=run date}: a re-run of the night replaces it."""
    # Every status gets a series, zeros included: a dashboard or alert then sees 0, not "no data".
    rows = {status: 0.0 for status in STATUSES} | {s: float(n) for s, n in summary.rows_by_status.items()}
    push_job_outcome(
        gateway, job=LABEL_JOB, run=config.run_date,
        gauges={
            "label_duration_seconds": (summary.seconds, "Wall time of the label run"),
            "label_posters_per_second": (summary.posters_per_second, "Posters scored (status ok) per second"),
            "label_last_success_timestamp_seconds": (time.time(), "Unix time the label run succeeded"),
        },
        labelled={
            "label_rows": LabelledGauge("Rows committed by the label run, by status", "status", rows),
            "model_info": LabelledGauge("The model that made the labels (always 1)", "model_version",
                                        {summary.model_version: 1.0}),
        },
    )


def print_summary(summary: LabelSummary) -> None:
    by_status = ", ".join(f"{status}={count}" for status, count in sorted(summary.rows_by_status.items()))
    print(f"labelled {summary.rows} movies in {summary.seconds:.1f}s ({by_status}); "
          f"{summary.posters_per_second:.1f} posters/s; model {summary.model_version}")
    print(f"output: {summary.output_uri}")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config, args = parse_config(argv)
    init_ray()
    try:
        summary = label_catalog(config)
    except (CatalogError, CheckpointError, StorageError, OutputIncompleteError, FileNotFoundError,
            ActorResourcesError, FailedNightError, NightChangedError) as error:
        logger.error("%s", error)
        push_job_failure(args.pushgateway, job=LABEL_JOB, run=config.run_date,
                         name="label_last_failure_timestamp_seconds", timestamp=time.time())
        return 2
    print_summary(summary)
    push_metrics(args.pushgateway, config, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
