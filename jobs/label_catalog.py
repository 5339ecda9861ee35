"""Label every movie of the catalogue with genres from its poster: the nightly Ray Data job.

    python jobs/label_catalog.py --catalog out/sample/catalog.parquet --model out/runs/demo-cnn/model \
        --output out/labels --run-date 2026-11-28

    ray job submit --working-dir . -- python jobs/label_catalog.py --catalog s3://bucket/catalog.parquet \
        --model s3://bucket/runs/genre-resnet50/model --output s3://bucket/labels --actors 4 --num-gpus-per-actor 1

Writes `<output>/run_date=<date>/*.parquet`, one row per catalogue movie (bad posters included, with a status),
replacing an earlier run of the same night only once the new one is complete. Exit 0 when the catalogue was
labelled (bad posters included); 2 when the catalogue, the model or the output cannot be used.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import date, datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # importable from the repo root, no install needed

from genre_pipeline.catalog import CatalogError  # noqa: E402
from genre_pipeline.checkpoints import CheckpointError  # noqa: E402
from genre_pipeline.inference import PRECISIONS  # noqa: E402
from genre_pipeline.labelling import (  # noqa: E402
    DEFAULT_BATCH_SIZE,
    IO_CPU_RESERVE,
    ActorResourcesError,
    LabelConfig,
    LabelSummary,
    label_catalog,
)
from genre_pipeline.labels import STATUSES  # noqa: E402
from genre_pipeline.output import OutputIncompleteError  # noqa: E402
from genre_pipeline.runtime import add_storage_flags, init_ray, setup_logging, storage_options_from  # noqa: E402
from genre_pipeline.storage import StorageError  # noqa: E402
from genre_pipeline.telemetry import LABEL_JOB, LabelledGauge, push_job_failure, push_job_outcome  # noqa: E402

logger = logging.getLogger("label_catalog")


def run_date(text: str) -> str:
    return date.fromisoformat(text).isoformat()


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = LabelConfig(catalog="", model="", output="", run_date="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalog", required=True, help="catalogue Parquet file or directory (local or s3://)")
    p.add_argument("--model", required=True, help="checkpoint directory (e.g. <storage-path>/<name>/model)")
    p.add_argument("--output", required=True, help="labels root; the night goes to <output>/run_date=<date>/")
    p.add_argument("--run-date", type=run_date, default=datetime.now(timezone.utc).date().isoformat(),
                   help="YYYY-MM-DD partition to (re)write; default: today in UTC")
    p.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                   help=f"images per forward pass; default {DEFAULT_BATCH_SIZE['cpu']} on CPU, "
                        f"{DEFAULT_BATCH_SIZE['cuda']} on GPU (lower it if the card runs out of memory)")
    p.add_argument("--actors", type=positive_int, default=defaults.actors,
                   help="PosterLabeller actors (model replicas); default on CPU: one per core of the cluster's "
                        "nodes, single-threaded; with GPUs: the cluster's GPUs over --num-gpus-per-actor")
    p.add_argument("--num-gpus-per-actor", type=float, default=defaults.num_gpus_per_actor,
                   help="GPUs per actor; 0 scores on CPU")
    p.add_argument("--cpus-per-actor", type=float, default=defaults.cpus_per_actor,
                   help="CPUs Ray reserves per actor; default 1 with GPUs, else the node's CPUs less "
                        f"{IO_CPU_RESERVE:g} for Ray Data's read tasks, shared by the node's actors")
    p.add_argument("--threads-per-actor", type=positive_int, default=defaults.threads_per_actor,
                   help="intra-op (and decode) threads per actor; default on CPU: the node's cores shared by its "
                        "actors (1 with the default --actors), with GPUs: the actor's CPUs")
    p.add_argument("--precision", choices=PRECISIONS, default=defaults.precision,
                   help="auto: bf16 autocast on GPUs, fp32 on CPUs; bf16 on CPUs is faster on AVX512-BF16 cores "
                        "(1.8x for resnet50) and moves scores slightly: compare two nights with evaluate.py")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in each actor (GPU runs)")
    p.add_argument("--rows-per-file", type=positive_int, default=defaults.rows_per_file,
                   help=f"label rows per output Parquet file (default {defaults.rows_per_file:,}); rows wait in "
                        "Ray's object store until a file's worth is scored")
    p.add_argument("--pushgateway", default=None, help="HOST:PORT of a Prometheus Pushgateway")
    add_storage_flags(p)
    return p


def parse_config(argv: list[str] | None) -> tuple[LabelConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    config = LabelConfig(catalog=args.catalog, model=args.model, output=args.output, run_date=args.run_date,
                         batch_size=args.batch_size, actors=args.actors, num_gpus_per_actor=args.num_gpus_per_actor,
                         cpus_per_actor=args.cpus_per_actor, threads_per_actor=args.threads_per_actor,
                         precision=args.precision, compile_model=args.compile,
                         rows_per_file=args.rows_per_file, storage_options=storage_options_from(args))
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
            ActorResourcesError) as error:
        logger.error("%s", error)
        push_job_failure(args.pushgateway, job=LABEL_JOB, run=config.run_date,
                         name="label_last_failure_timestamp_seconds", timestamp=time.time())
        return 2
    print_summary(summary)
    push_metrics(args.pushgateway, config, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
