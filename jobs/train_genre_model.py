"""Fine-tune a genre model on the catalogue's train split with Ray Train, and publish the best checkpoint.

    python jobs/train_genre_model.py --catalog out/ml1m/catalog.parquet --num-workers 2 --cpus-per-worker 0.5 \
        --storage-path out/runs --name ml1m-lite0

The defaults are the recipe for real posters: an ImageNet-pretrained EfficientNet-Lite0 (weights from an
installed package, no network), its head trained first on cached features of the frozen backbone, then the
whole network for --epochs with the backbone at a quarter of the LR; thresholds tuned for micro-F1 on validation.
From scratch instead: `--arch cnn --head-epochs 0 --epochs 20 --lr 1e-3`.

Checkpoints go to `<storage-path>/<name>/` (Ray Train's layout); the best epoch (validation mAP@3) is copied
to `<storage-path>/<name>/model`, the URI to give the label job. Running the same command again resumes
from the latest checkpoint. Add `--use-gpu` on a GPU cluster.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # importable from the repo root, no install needed

from genre_pipeline.data import storage  # noqa: E402
from genre_pipeline.evaluate.metrics import THRESHOLD_OBJECTIVES, metrics_line  # noqa: E402
from genre_pipeline.model.architectures import ARCHS, PRETRAINED_ARCHS, WeightsUnavailableError  # noqa: E402
from genre_pipeline.runtime import add_storage_flags, init_ray, setup_logging, storage_options_from  # noqa: E402
from genre_pipeline.telemetry import TRAIN_JOB, LabelledGauge, push_job_failure, push_job_outcome  # noqa: E402
from genre_pipeline.train.driver import (  # noqa: E402
    PRETRAINED_HEAD_EPOCHS,
    TrainJobConfig,
    TrainSummary,
    run_training,
)

logger = logging.getLogger("train_genre_model")


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainJobConfig(catalog="", storage_path="", name="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalog", required=True, help="catalogue Parquet (local or s3://)")
    p.add_argument("--storage-path", required=True, help="where Ray Train keeps runs and checkpoints")
    p.add_argument("--name", required=True, help="run name; the same name resumes the same run")
    p.add_argument("--arch", choices=ARCHS, default=defaults.arch,
                   help=f"model architecture (default {defaults.arch}); pretrained by default: {PRETRAINED_ARCHS}")
    p.add_argument("--epochs", type=int, default=defaults.epochs,
                   help="full-network epochs, after the head phase (a resumed run counts on)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per step per worker")
    p.add_argument("--lr", type=float, default=defaults.lr, help="AdamW LR of the head in full-network epochs")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay")
    p.add_argument("--num-workers", type=int, default=defaults.num_workers, help="Ray Train workers (DDP)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, nccl")
    p.add_argument("--cpus-per-worker", type=float, default=defaults.cpus_per_worker,
                   help="CPUs reserved per worker; leave some for Ray Data's decoding tasks")
    p.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                   help="share of train rows held out for validation, by a stable hash of movie_id")
    p.add_argument("--image-size", type=int, default=None,
                   help="input width in pixels; default: the arch's (a pretrained backbone's own). The "
                        "EfficientNet-Lites take posters whole at 2:3 (height 1.5 x width), the others squares")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="start from ImageNet weights: the installed package's for the EfficientNet-Lites (the "
                        "default), torchvision's download for resnet50 (off by default)")
    p.add_argument("--weights", default=None,
                   help="start from this ImageNet state_dict file instead (path or s3://)")
    p.add_argument("--head-epochs", type=int, default=None,
                   help=f"head-only epochs on cached features of the frozen backbone, before the full-network "
                        f"epochs; the best on validation is kept (default: {PRETRAINED_HEAD_EPOCHS} for a "
                        "pretrained backbone, 0 from scratch)")
    p.add_argument("--head-lr", type=float, default=defaults.head_lr, help="AdamW LR of the head phase")
    p.add_argument("--backbone-lr-scale", type=float, default=defaults.backbone_lr_scale,
                   help="backbone LR = lr x this in full-network epochs")
    p.add_argument("--patience", type=int, default=defaults.patience,
                   help="stop after N full-network epochs without a better validation mAP@3; 0 = run all epochs")
    p.add_argument("--threshold-objective", choices=THRESHOLD_OBJECTIVES, default=defaults.threshold_objective,
                   help="the F1 that validation thresholds maximise: micro (the default: one threshold for all "
                        "genres, every label counts), macro (per genre; finds rare genres at the cost of many "
                        "false labels) or samples (one threshold, per-movie F1)")
    p.add_argument("--class-weighting", action=argparse.BooleanOptionalAction, default=defaults.class_weighting,
                   help="BCE with per-genre positive weights sqrt(neg/pos) against imbalance (helps macro-F1)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="torch seed")
    p.add_argument("--pushgateway", default=None, help="HOST:PORT of a Prometheus Pushgateway")
    add_storage_flags(p)
    return p


def parse_config(argv: list[str] | None) -> tuple[TrainJobConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    config = TrainJobConfig(
        catalog=args.catalog, storage_path=args.storage_path, name=args.name, arch=args.arch, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, num_workers=args.num_workers,
        use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker, val_fraction=args.val_fraction,
        image_size=args.image_size, pretrained=args.pretrained, weights=args.weights, head_epochs=args.head_epochs,
        head_lr=args.head_lr, backbone_lr_scale=args.backbone_lr_scale, patience=args.patience,
        threshold_objective=args.threshold_objective, class_weighting=args.class_weighting, seed=args.seed,
        storage_options=storage_options_from(args),
    )
    return config, args


def check_storage(config: TrainJobConfig) -> None:
    """Fail before Ray starts when the catalogue (or weights file) cannot be read or the storage path written:
    a wrong endpoint, credential, bucket or prefix then costs seconds, with a message naming the URI."""
    options = config.storage_options
    storage.check_readable(config.catalog, options)
    if config.weights:
        storage.check_readable(config.weights, options)
    storage.check_writable(config.storage_path, options)


def push_metrics(gateway: str | None, config: TrainJobConfig, summary: TrainSummary, seconds: float) -> None:
    """The published model's validation metrics, grouped by {job, run=run name}: a resumed run replaces them."""
    meta = summary.meta
    gauges = {f"train_{name}": (value, f"Validation {name.removeprefix('val_')} of the published (best) epoch")
              for name, value in meta.metrics.items()}
    gauges.update({
        "train_best_epoch": (meta.epoch, "Epoch of the published checkpoint"),
        "train_epochs": (summary.epochs_run, "Epochs the run has completed (resumed runs count on)"),
        "train_duration_seconds": (seconds, "Wall time of the training job"),
        "train_last_success_timestamp_seconds": (time.time(), "Unix time the training job succeeded"),
    })
    push_job_outcome(gateway, job=TRAIN_JOB, run=config.name, gauges=gauges, labelled={
        "model_info": LabelledGauge("The model the run published (always 1)", "model_version",
                                    {meta.model_version: 1.0})})


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config, args = parse_config(argv)
    started = time.monotonic()
    try:
        config.validate()
        check_storage(config)
        init_ray()
        summary = run_training(config)
    except (WeightsUnavailableError, ValueError, FileNotFoundError, storage.StorageError) as error:
        # ValueError includes TrainResourcesError and ResumeMismatchError
        logger.error("%s", error)
        push_job_failure(args.pushgateway, job=TRAIN_JOB, run=config.name,
                         name="train_last_failure_timestamp_seconds", timestamp=time.time())
        return 2
    push_metrics(args.pushgateway, config, summary, time.monotonic() - started)
    print(f"best epoch {summary.meta.epoch} of {summary.epochs_run}: {metrics_line(summary.meta.metrics)}")
    print(f"model {summary.meta.model_version} published to {summary.model_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
