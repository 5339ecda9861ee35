"""The poster model's recipe as a library function: catalogue in, Ray Train run, best checkpoint published.

Its rows and datasets, and its worker loop (`loop`), on the trainer both recipes share (`trainer`; the fusion
model's recipe is `fusion_driver`).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field

import pyarrow as pa
import ray
from ray.train.torch import TorchTrainer

from genre_pipeline import cluster
from genre_pipeline.config_fields import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Check, at_least, check_fields, option
from genre_pipeline.data import storage
from genre_pipeline.errors import ConfigError
from genre_pipeline.evaluate.metrics import THRESHOLD_OBJECTIVES
from genre_pipeline.genres import GENRES
from genre_pipeline.model.architectures import ARCHS, PRETRAINED_ARCHS, default_preprocess, weights_source
from genre_pipeline.telemetry import LabelledGauge
from genre_pipeline.train.fitting import TRAIN_DATASET, VAL_DATASET
from genre_pipeline.train.loop import TRAIN_FEATURES_DATASET, LoopConfig, recipe_of, train_loop_per_worker
from genre_pipeline.train.rows import fingerprint, load_training_rows, positive_weights, to_dataset
from genre_pipeline.train.trainer import (
    DEFAULT_ARCH,
    VAL_FRACTION,
    TrainResourcesError,
    TrainSummary,
    build_torch_trainer,
    check_before_start,
    check_resources,
    fit_within,
    run_settings,
    split_for_training,
    train_and_publish,
)

logger = logging.getLogger(__name__)

# The job and the cluster tests import the shared trainer's names from here too.
__all__ = ["TrainJobConfig", "TrainResourcesError", "TrainSummary", "build_trainer", "check_resources", "fit_within",
           "loop_config", "run_training", "train_outcome"]

# Head phase length when the backbone starts pretrained: cheap (cached features), stopped early on validation.
PRETRAINED_HEAD_EPOCHS = 100
MIN_IMAGE_SIZE = 16  # pixels; the models' strides leave nothing to classify below it
# Settings a resumed run must share with its checkpoints: the others would be ignored (optimizer state and
# schedule come from the checkpoint) or would train a different model.
RESUME_FIXED = ("arch", "data_fingerprint", "image_size", "lr", "weight_decay", "head_lr", "head_epochs",
                "backbone_lr_scale", "batch_size", "class_weighting", "seed", "threshold_objective")
# Keep the best epoch (what gets published) and the latest (what resuming needs).
CHECKPOINTS_KEPT = 2
# The training flags' rules beyond config_fields' own.
IMAGE_SIZE = at_least(MIN_IMAGE_SIZE)
OBJECTIVE = Check(lambda value: value in THRESHOLD_OBJECTIVES, f"must be one of {', '.join(THRESHOLD_OBJECTIVES)}")


@dataclass(frozen=True)
class TrainJobConfig:
    """The training job's settings; each field's metadata is its flag in jobs/train_genre_model.py. The defaults
    are the recommended recipe for real posters: a pretrained EfficientNet-Lite0, its head trained on cached
    features, then three epochs of the whole network."""

    catalog: str = field(metadata=option("catalogue Parquet (local or s3://)"))
    storage_path: str = field(metadata=option("where Ray Train keeps runs and checkpoints"))
    name: str = field(metadata=option("run name; the same name resumes the same run"))
    arch: str = field(default=DEFAULT_ARCH, metadata=option(
        f"model architecture (default {DEFAULT_ARCH}); pretrained by default: {PRETRAINED_ARCHS}", choices=ARCHS))
    epochs: int = field(default=3, metadata=option(
        "full-network epochs, after the head phase (a resumed run counts on)", check=NON_NEGATIVE))
    batch_size: int = field(default=32, metadata=option("images per step per worker", check=AT_LEAST_1))
    # The backbone's LR is lr x backbone_lr_scale.
    lr: float = field(default=2e-4, metadata=option("AdamW LR of the head in full-network epochs", check=POSITIVE))
    weight_decay: float = field(default=1e-2, metadata=option("AdamW weight decay", check=NON_NEGATIVE))
    num_workers: int = field(default=2, metadata=option("Ray Train workers (DDP)", check=AT_LEAST_1))
    use_gpu: bool = field(default=False, metadata=option("one GPU per worker, nccl"))
    cpus_per_worker: float = field(default=1.0, metadata=option(
        "CPUs reserved per worker; leave some for Ray Data's decoding tasks", check=POSITIVE))
    val_fraction: float = field(default=0.15, metadata=option(
        "share of train rows held out for validation, by a stable hash of movie_id", check=VAL_FRACTION))
    image_size: int | None = field(default=None, metadata=option(
        "input width in pixels; default: the arch's (a pretrained backbone's own). The EfficientNet-Lites take "
        "posters whole at 2:3 (height 1.5 x width), the others squares", check=IMAGE_SIZE))
    pretrained: bool | None = field(default=None, metadata=option(
        "start from ImageNet weights: the installed package's for the EfficientNet-Lites (the default), "
        "torchvision's download for resnet50 (off by default)", action=argparse.BooleanOptionalAction))
    weights: str | None = field(default=None, metadata=option(
        "start from this ImageNet state_dict file instead (path or s3://)"))
    head_epochs: int | None = field(default=None, metadata=option(
        "head-only epochs on cached features of the frozen backbone, before the full-network epochs; the best on "
        f"validation is kept (default: {PRETRAINED_HEAD_EPOCHS} for a pretrained backbone, 0 from scratch)",
        check=NON_NEGATIVE))
    head_lr: float = field(default=3e-5, metadata=option("AdamW LR of the head phase", check=POSITIVE))
    backbone_lr_scale: float = field(default=0.25, metadata=option(
        "backbone LR = lr x this in full-network epochs", check=POSITIVE))
    patience: int = field(default=0, metadata=option(
        "stop after N full-network epochs without a better validation mAP@3; 0 = run all epochs", check=NON_NEGATIVE))
    threshold_objective: str = field(default="micro", metadata=option(
        "the F1 that validation thresholds maximise: micro (the default: one threshold for all genres, every "
        "label counts), macro (per genre; finds rare genres at the cost of many false labels) or samples (one "
        "threshold, per-movie F1)", choices=THRESHOLD_OBJECTIVES, check=OBJECTIVE))
    class_weighting: bool = field(default=False, metadata=option(
        "BCE with per-genre positive weights sqrt(neg/pos) against imbalance (helps macro-F1)",
        action=argparse.BooleanOptionalAction))
    seed: int = field(default=0, metadata=option("torch seed", check=NON_NEGATIVE))
    start_timeout: float = field(default=cluster.DEFAULT_START_TIMEOUT_SECONDS, metadata=option(
        "seconds a joined cluster may take to offer the workers' resources, and Ray Train to place the workers "
        f"at each (re)start; then the run fails with exit 2 (default {cluster.DEFAULT_START_TIMEOUT_SECONDS:g})",
        check=POSITIVE))
    storage_options: storage.StorageOptions = field(default_factory=storage.StorageOptions)  # the storage flags'

    def __post_init__(self) -> None:
        check_fields(self)
        if self.resolved_head_epochs > 0 and not self.starts_pretrained:
            raise ConfigError(f"--head-epochs {self.head_epochs}: a head phase needs a pretrained backbone "
                              f"(arch {self.arch!r} starts from random weights); pass --head-epochs 0")
        if self.epochs == 0 and self.resolved_head_epochs == 0:
            raise ConfigError("--epochs 0 and no head phase: nothing would be trained")

    @property
    def starts_pretrained(self) -> bool:
        if self.pretrained is None:
            return self.arch in PRETRAINED_ARCHS or self.weights is not None
        return self.pretrained or self.weights is not None

    @property
    def resolved_head_epochs(self) -> int:
        if self.head_epochs is None:
            return PRETRAINED_HEAD_EPOCHS if self.starts_pretrained else 0
        return self.head_epochs


def loop_config(config: TrainJobConfig, train_rows: pa.Table, val_rows: pa.Table) -> LoopConfig:
    preprocess = default_preprocess(config.arch, config.image_size)
    pretrained = config.starts_pretrained and not config.weights
    return LoopConfig(
        arch=config.arch, genres=list(GENRES), preprocess=preprocess,
        epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, weight_decay=config.weight_decay,
        backbone_lr_scale=config.backbone_lr_scale, head_epochs=config.resolved_head_epochs,
        head_lr=config.head_lr, freeze_batch_norm=config.starts_pretrained,
        pos_weight=positive_weights(train_rows, GENRES) if config.class_weighting else None,
        patience=config.patience, threshold_objective=config.threshold_objective, pretrained=pretrained,
        weights=config.weights, seed=config.seed,
        weights_source=weights_source(arch=config.arch, pretrained=pretrained, weights=config.weights,
                                      options=config.storage_options),
        data_fingerprint=fingerprint(train_rows, val_rows), storage_options=config.storage_options,
    )


def build_trainer(config: TrainJobConfig) -> tuple[TorchTrainer, LoopConfig]:
    rows = load_training_rows(config.catalog, config.storage_options)
    train_rows, val_rows = split_for_training(config, rows)
    loop = loop_config(config, train_rows, val_rows)
    settings = run_settings(loop.arch, loop.data_fingerprint, loop.preprocess.image_size, loop.threshold_objective,
                            recipe_of(loop))
    check_before_start(config, settings, RESUME_FIXED, config.start_timeout)
    logger.info("training on %d posters, validating on %d", train_rows.num_rows, val_rows.num_rows)
    size = loop.preprocess.shape

    def dataset(rows: pa.Table, augment: bool) -> ray.data.Dataset:
        return to_dataset(rows, genres=loop.genres, image_size=size, augment=augment, options=config.storage_options)

    datasets = {TRAIN_DATASET: dataset(train_rows, True), VAL_DATASET: dataset(val_rows, False)}
    if loop.head_epochs:
        datasets[TRAIN_FEATURES_DATASET] = dataset(train_rows, False)
    trainer = build_torch_trainer(config, train_loop_per_worker, loop, monitor=loop.monitor,
                                  checkpoints_kept=CHECKPOINTS_KEPT, datasets=datasets,
                                  whole=(VAL_DATASET, TRAIN_FEATURES_DATASET))
    return trainer, loop


def run_training(config: TrainJobConfig) -> TrainSummary:
    trainer, loop = build_trainer(config)
    return train_and_publish(trainer, config, loop.monitor)


def train_outcome(summary: TrainSummary, seconds: float) -> dict:
    """What a training job pushes: the published model's validation metrics, its epoch, the run's length."""
    meta = summary.meta
    gauges = {f"train_{name}": (value, f"Validation {name.removeprefix('val_')} of the published (best) epoch")
              for name, value in meta.metrics.items()}
    gauges.update({
        "train_best_epoch": (meta.epoch, "Epoch of the published checkpoint"),
        "train_epochs": (summary.epochs_run, "Epochs the run has completed (resumed runs count on)"),
        "train_duration_seconds": (seconds, "Wall time of the training job"),
        "train_last_success_timestamp_seconds": (time.time(), "Unix time the training job succeeded"),
    })
    labelled = {"model_info": LabelledGauge("The model the run published (always 1)", "model_version",
                                            {meta.model_version: 1.0})}
    return {"gauges": gauges, "labelled": labelled}
