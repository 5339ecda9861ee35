"""The training job as a library function: catalogue in, Ray Train run, best checkpoint published."""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import ray
import ray.train
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

from genre_pipeline import cluster
from genre_pipeline.config_fields import POSITIVE, check_fields, option
from genre_pipeline.cuda_guard import check_gpu_workers
from genre_pipeline.data import storage
from genre_pipeline.errors import ConfigError, JobInputError
from genre_pipeline.evaluate.metrics import THRESHOLD_OBJECTIVES
from genre_pipeline.genres import GENRES
from genre_pipeline.model.architectures import ARCHS, PRETRAINED_ARCHS, default_preprocess, weights_source
from genre_pipeline.model.checkpoints import META_FILE, ModelMeta, publish_checkpoint
from genre_pipeline.runtime import TORCH_WORKER_ENV
from genre_pipeline.telemetry import LabelledGauge
from genre_pipeline.train.data import (
    fingerprint,
    load_training_rows,
    positive_weights,
    split_rows,
    to_dataset,
)
from genre_pipeline.train.loop import (
    TRAIN_DATASET,
    TRAIN_FEATURES_DATASET,
    VAL_DATASET,
    LoopConfig,
    recipe_of,
    train_loop_per_worker,
)

logger = logging.getLogger(__name__)

PUBLISHED_MODEL_DIR = "model"  # <storage-path>/<name>/model: the stable URI the label job reads


DEFAULT_ARCH = "efficientnet_lite0"  # the recommended recipe's backbone (see TrainJobConfig)
# Head phase length when the backbone starts pretrained: cheap (cached features), stopped early on validation.
PRETRAINED_HEAD_EPOCHS = 100
MIN_IMAGE_SIZE = 16  # pixels; the models' strides leave nothing to classify below it
# A lost worker (OOM, preempted node) restarts the workers from the last checkpoint this many times.
MAX_WORKER_FAILURES = 3
# Ray Data decodes the posters beside the workers: it needs a CPU the workers do not reserve.
DATA_CPU_RESERVE = 1.0
# How long a joined cluster may take to offer the workers' resources (KubeRay worker pods still starting).
RESOURCE_WAIT_SECONDS = cluster.DEFAULT_START_TIMEOUT_SECONDS
# A start that could not place the workers (or lost one while they started) is retried this many times; then
# the run fails, instead of Ray Train's default of retrying for ever.
MAX_START_FAILURES = 1
# Settings a resumed run must share with its checkpoints: the others would be ignored (optimizer state and
# schedule come from the checkpoint) or would train a different model.
RESUME_FIXED = ("arch", "data_fingerprint", "image_size", "lr", "weight_decay", "head_lr", "head_epochs",
                "backbone_lr_scale", "batch_size", "class_weighting", "seed", "threshold_objective")


class TrainResourcesError(cluster.ClusterResourcesError):
    """Workers the cluster cannot hold beside Ray Data's decoding, or could not place in time: the run would
    wait forever."""


class ResumeMismatchError(JobInputError, ValueError):
    """A run name resumed with settings or data that differ from its checkpoints."""


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
        "full-network epochs, after the head phase (a resumed run counts on)"))
    batch_size: int = field(default=32, metadata=option("images per step per worker"))
    # The backbone's LR is lr x backbone_lr_scale.
    lr: float = field(default=2e-4, metadata=option("AdamW LR of the head in full-network epochs"))
    weight_decay: float = field(default=1e-2, metadata=option("AdamW weight decay"))
    num_workers: int = field(default=2, metadata=option("Ray Train workers (DDP)"))
    use_gpu: bool = field(default=False, metadata=option("one GPU per worker, nccl"))
    cpus_per_worker: float = field(default=1.0, metadata=option(
        "CPUs reserved per worker; leave some for Ray Data's decoding tasks"))
    val_fraction: float = field(default=0.15, metadata=option(
        "share of train rows held out for validation, by a stable hash of movie_id"))
    image_size: int | None = field(default=None, metadata=option(
        "input width in pixels; default: the arch's (a pretrained backbone's own). The EfficientNet-Lites take "
        "posters whole at 2:3 (height 1.5 x width), the others squares"))
    pretrained: bool | None = field(default=None, metadata=option(
        "start from ImageNet weights: the installed package's for the EfficientNet-Lites (the default), "
        "torchvision's download for resnet50 (off by default)", action=argparse.BooleanOptionalAction))
    weights: str | None = field(default=None, metadata=option(
        "start from this ImageNet state_dict file instead (path or s3://)"))
    head_epochs: int | None = field(default=None, metadata=option(
        "head-only epochs on cached features of the frozen backbone, before the full-network epochs; the best on "
        f"validation is kept (default: {PRETRAINED_HEAD_EPOCHS} for a pretrained backbone, 0 from scratch)"))
    head_lr: float = field(default=3e-5, metadata=option("AdamW LR of the head phase"))
    backbone_lr_scale: float = field(default=0.25, metadata=option(
        "backbone LR = lr x this in full-network epochs"))
    patience: int = field(default=0, metadata=option(
        "stop after N full-network epochs without a better validation mAP@3; 0 = run all epochs"))
    threshold_objective: str = field(default="micro", metadata=option(
        "the F1 that validation thresholds maximise: micro (the default: one threshold for all genres, every "
        "label counts), macro (per genre; finds rare genres at the cost of many false labels) or samples (one "
        "threshold, per-movie F1)", choices=THRESHOLD_OBJECTIVES))
    class_weighting: bool = field(default=False, metadata=option(
        "BCE with per-genre positive weights sqrt(neg/pos) against imbalance (helps macro-F1)",
        action=argparse.BooleanOptionalAction))
    seed: int = field(default=0, metadata=option("torch seed"))
    start_timeout: float = field(default=cluster.DEFAULT_START_TIMEOUT_SECONDS, metadata=option(
        "seconds a joined cluster may take to offer the workers' resources, and Ray Train to place the workers "
        f"at each (re)start; then the run fails with exit 2 (default {cluster.DEFAULT_START_TIMEOUT_SECONDS:g})",
        check=POSITIVE))
    storage_options: storage.StorageOptions = field(default_factory=storage.StorageOptions)  # the storage flags'

    def __post_init__(self) -> None:
        check_fields(self)

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

    def validate(self) -> None:
        """Settings that cannot work, refused before Ray starts."""
        if self.threshold_objective not in THRESHOLD_OBJECTIVES:
            raise ConfigError(f"--threshold-objective {self.threshold_objective!r}: one of {THRESHOLD_OBJECTIVES}")
        if self.resolved_head_epochs > 0 and not self.starts_pretrained:
            raise ConfigError(f"--head-epochs {self.head_epochs}: a head phase needs a pretrained backbone "
                             f"(arch {self.arch!r} starts from random weights); pass --head-epochs 0")
        if self.epochs == 0 and self.resolved_head_epochs == 0:
            raise ConfigError("--epochs 0 and no head phase: nothing would be trained")
        self.check_ranges()

    def check_ranges(self) -> None:
        def shown(name: str) -> str:
            return f"--{name.replace('_', '-')} {getattr(self, name)}"

        for name in ("epochs", "patience", "seed", "weight_decay", "head_epochs"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"{shown(name)}: must be 0 or more")
        for name in ("batch_size", "num_workers", "lr", "head_lr", "cpus_per_worker", "backbone_lr_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{shown(name)}: must be more than 0")
        if self.image_size is not None and self.image_size < MIN_IMAGE_SIZE:
            raise ConfigError(f"{shown('image_size')}: must be at least {MIN_IMAGE_SIZE}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"{shown('val_fraction')}: must be between 0 and 1")


@dataclass(frozen=True)
class TrainSummary:
    model_uri: str
    meta: ModelMeta
    epochs_run: int


def loop_config(config: TrainJobConfig, train_rows, val_rows) -> LoopConfig:
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


class TrainWorkers(Protocol):
    """The worker settings both training jobs' configs share."""

    num_workers: int
    cpus_per_worker: float
    use_gpu: bool


def worker_pool(config: TrainWorkers) -> cluster.Pool:
    return cluster.Pool("Ray Train worker", config.num_workers, config.cpus_per_worker,
                        1.0 if config.use_gpu else 0.0, spare_cpus=DATA_CPU_RESERVE)


def check_resources(config: TrainWorkers, wait_seconds: float) -> None:
    """Refuse workers that no node can hold with their CPUs (and GPU), or that leave Ray Data no CPU for its
    decoding; a joined cluster gets `wait_seconds` for its nodes to appear first."""

    def attempt() -> None:
        nodes = cluster.live_nodes()
        cluster.check_pool(worker_pool(config), nodes, advice=worker_advice(config, nodes),
                           error=TrainResourcesError)

    cluster.within(wait_seconds, attempt)


def worker_advice(config: TrainWorkers, nodes: list[cluster.NodeResources]) -> str:
    """The CPUs per worker the cluster's CPUs would hold beside Ray Data's, as a suggestion."""
    fitting = math.floor((sum(node.cpus for node in nodes) - DATA_CPU_RESERVE) / config.num_workers * 10) / 10
    smaller = f"--cpus-per-worker {fitting:g} or " if 0 < fitting < config.cpus_per_worker else ""
    return f"try {smaller}fewer workers{', or GPU nodes' if config.use_gpu else ''}, or add nodes"


def failure_config() -> ray.train.FailureConfig:
    """Worker failures restart the workers from the last checkpoint; a start that cannot place them fails."""
    return ray.train.FailureConfig(max_failures=MAX_WORKER_FAILURES, controller_failure_limit=MAX_START_FAILURES)


def fit_within(trainer: TorchTrainer, config: TrainWorkers, start_timeout: float) -> ray.train.Result:
    """`trainer.fit()`, each start of its workers bounded by `start_timeout` seconds (the trainer needs
    `failure_config()`): workers that cannot be placed (other jobs hold the resources, a node was lost) fail the
    run with TrainResourcesError instead of Ray Train's retrying for ever."""
    # Ray Train hands this variable from the driver to its controller, which reads it at each start.
    previous = os.environ.get(WORKER_GROUP_START_TIMEOUT_S_ENV_VAR)
    os.environ[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] = f"{start_timeout:g}"
    try:
        return trainer.fit()
    except ray.train.ControllerError as error:
        if not isinstance(error.controller_failure, WorkerGroupStartupTimeoutError):
            raise
        raise TrainResourcesError(
            f"{worker_pool(config).describe()} could not be placed within --start-timeout {start_timeout:g} s "
            f"({MAX_START_FAILURES + 1} tries): other jobs hold the resources, or a node was lost and not replaced"
        ) from None
    finally:
        if previous is None:
            os.environ.pop(WORKER_GROUP_START_TIMEOUT_S_ENV_VAR, None)
        else:
            os.environ[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] = previous


class TrainRun(Protocol):
    """Where a training job keeps a run: both training jobs' configs are one."""

    storage_path: str
    name: str
    storage_options: storage.StorageOptions


def latest_checkpoint_meta(config: TrainRun) -> ModelMeta | None:
    """The meta of the run's newest checkpoint, if the run name has any (a resume)."""
    fs, root = storage.fsspec_filesystem(storage.join(config.storage_path, config.name), config.storage_options)
    try:
        folders = sorted(p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith("checkpoint_"))
    except FileNotFoundError:
        return None
    for folder in reversed(folders):
        if fs.exists(f"{folder}/{META_FILE}"):
            return ModelMeta.from_json(fs.cat_file(f"{folder}/{META_FILE}").decode())
    return None


def checkpoint_settings(meta: ModelMeta) -> dict:
    """What made a checkpoint, as resume checks compare it: data, input size, recipe, and a fusion model's
    signals and the versions of its embedding tables."""
    tables = meta.fusion.get("embeddings", {})
    return {"arch": meta.arch, "data_fingerprint": meta.data_fingerprint, "image_size": meta.preprocess.image_size,
            "threshold_objective": meta.threshold_objective, "signals": list(meta.signals),
            "embeddings": {signal: tables[signal]["version"] for signal in sorted(tables)}, **meta.recipe}


def check_settings_unchanged(config: TrainRun, now: dict, fixed: Sequence[str]) -> None:
    """Refuse to resume a run whose newest checkpoint was made with other values of the `fixed` settings
    (those a checkpoint from before a setting was recorded lacks are not compared)."""
    saved = latest_checkpoint_meta(config)
    if saved is None:
        return
    was = checkpoint_settings(saved)
    changed = [f"{key}: {was[key]!r} -> {now.get(key)!r}" for key in fixed
               if key in was and was[key] != now.get(key)]
    if changed:
        raise ResumeMismatchError(
            f"run {config.name!r} in {config.storage_path} was trained with other settings or data "
            f"({'; '.join(changed)}); resuming would mix them. Re-run with its settings, or start a new run "
            "with another --name.")


def check_resume(config: TrainJobConfig, loop: LoopConfig) -> None:
    """A run name resumes only with the data and settings its checkpoints were made with."""
    now = {"arch": loop.arch, "data_fingerprint": loop.data_fingerprint, "image_size": loop.preprocess.image_size,
           "threshold_objective": loop.threshold_objective, **recipe_of(loop)}
    check_settings_unchanged(config, now, RESUME_FIXED)


def build_trainer(config: TrainJobConfig) -> tuple[TorchTrainer, LoopConfig]:
    config.validate()
    rows = load_training_rows(config.catalog, config.storage_options)
    train_rows, val_rows = split_rows(rows, config.val_fraction)
    if val_rows.num_rows == 0:
        raise ConfigError(f"{config.catalog}: --val-fraction {config.val_fraction} leaves no validation rows")
    loop = loop_config(config, train_rows, val_rows)
    check_resume(config, loop)
    # A Ray this job started itself cannot grow; a joined cluster may still be adding nodes.
    check_resources(config, config.start_timeout if os.environ.get("RAY_ADDRESS") else 0)
    if config.use_gpu:  # a node whose driver cannot run the image's CUDA fails here, not in the first step
        check_gpu_workers(config.start_timeout)
    logger.info("training on %d posters, validating on %d", train_rows.num_rows, val_rows.num_rows)
    size = loop.preprocess.shape

    def dataset(rows, augment: bool) -> ray.data.Dataset:
        return to_dataset(rows, genres=loop.genres, image_size=size, augment=augment, options=config.storage_options)

    datasets = {TRAIN_DATASET: dataset(train_rows, True), VAL_DATASET: dataset(val_rows, False)}
    if loop.head_epochs:
        datasets[TRAIN_FEATURES_DATASET] = dataset(train_rows, False)
    fs, path = storage.arrow_filesystem(config.storage_path, config.storage_options)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": loop, "cpus_per_worker": config.cpus_per_worker},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=config.name, storage_path=path, storage_filesystem=fs,
            worker_runtime_env={"env_vars": TORCH_WORKER_ENV},
            failure_config=failure_config(),
            # Keep the best epoch (what gets published) and the latest (what resuming needs).
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=loop.monitor, checkpoint_score_order="max"),
        ),
        datasets=datasets,
        dataset_config=WholeValidationSplit(),
    )
    return trainer, loop


class WholeValidationSplit(ray.train.DataConfig):
    """Training rows split equally, the other datasets split whole. DDP steps every rank in lockstep, so each needs
    the same number of training batches (Ray's `equal=True` split drops up to world_size - 1 rows for that). The
    validation shards and the head phase's feature shards are gathered on every rank: dropping rows there would
    score each epoch, and tune the thresholds, on a different subset of the validation set."""

    WHOLE = (VAL_DATASET, TRAIN_FEATURES_DATASET)

    def configure(self, datasets: dict[str, ray.data.Dataset], world_size: int, worker_handles: list | None,
                  worker_node_ids: list | None, **kwargs) -> list[dict[str, ray.data.DataIterator]]:
        equal = {name: ds for name, ds in datasets.items() if name not in self.WHOLE}
        shards = super().configure(equal, world_size, worker_handles, worker_node_ids, **kwargs)
        for name in self.WHOLE:
            if name in datasets:
                whole = datasets[name].copy(datasets[name])
                whole.context.execution_options = self.default_ingest_options()
                for shard, split in zip(shards, whole.streaming_split(world_size, equal=False), strict=True):
                    shard[name] = split
        return shards


def publish_best(result: ray.train.Result, config: TrainJobConfig, monitor: str) -> TrainSummary:
    """Publish the best checkpoint as <storage-path>/<name>/versions/<model_version>/ and point
    <storage-path>/<name>/model, the URI nightly labelling reads, to it."""
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if monitor in m]
    if not scored:
        raise RuntimeError(f"training run {config.name!r} produced no checkpoint")
    best, _ = max(scored, key=lambda pair: pair[1][monitor])
    target = storage.join(config.storage_path, config.name, PUBLISHED_MODEL_DIR)
    with best.as_directory() as directory:
        publish_checkpoint(directory, target, config.storage_options)
        meta = ModelMeta.from_json((Path(directory) / META_FILE).read_text())
    # The last report (not the kept checkpoints, which may omit it) says how far the run went.
    epochs_run = int((result.metrics or {}).get("epoch", max(int(m.get("epoch", 0)) for _, m in scored)))
    return TrainSummary(target, meta, epochs_run)


def run_training(config: TrainJobConfig) -> TrainSummary:
    trainer, loop = build_trainer(config)
    result = fit_within(trainer, config, config.start_timeout)
    return publish_best(result, config, loop.monitor)


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
