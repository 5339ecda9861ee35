"""The training job as a library function: catalogue in, Ray Train run, best checkpoint published."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import ray.train
from ray.train.torch import TorchTrainer

from genre_pipeline import storage
from genre_pipeline.checkpoints import META_FILE, ModelMeta, publish_checkpoint
from genre_pipeline.evaluation import THRESHOLD_OBJECTIVES
from genre_pipeline.genres import GENRES
from genre_pipeline.models import PRETRAINED_ARCHS, default_preprocess, weights_source
from genre_pipeline.runtime import TORCH_WORKER_ENV
from genre_pipeline.training import (
    TRAIN_DATASET,
    TRAIN_FEATURES_DATASET,
    VAL_DATASET,
    LoopConfig,
    train_loop_per_worker,
)
from genre_pipeline.training_data import (
    fingerprint,
    load_training_rows,
    positive_weights,
    split_rows,
    to_dataset,
)

logger = logging.getLogger(__name__)

PUBLISHED_MODEL_DIR = "model"  # <storage-path>/<name>/model: the stable URI the label job reads


# Head phase length when the backbone starts pretrained: cheap (cached features), stopped early on validation.
PRETRAINED_HEAD_EPOCHS = 100


@dataclass(frozen=True)
class TrainJobConfig:
    """The training job's settings. The defaults are the recommended recipe for real posters: a pretrained
    EfficientNet-Lite0, its head trained on cached features, then three epochs of the whole network."""

    catalog: str
    storage_path: str
    name: str
    arch: str = "efficientnet_lite0"
    epochs: int = 3  # full-network epochs (after the head phase)
    batch_size: int = 32
    lr: float = 2e-4  # the head's LR in full-network epochs; the backbone's is lr x backbone_lr_scale
    weight_decay: float = 1e-2
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    val_fraction: float = 0.15
    image_size: int | None = None  # input width; None: the arch's own (a pretrained backbone's ImageNet size)
    pretrained: bool | None = None  # None: the arch's default (pretrained for the EfficientNet-Lites)
    weights: str | None = None
    head_epochs: int | None = None  # None: PRETRAINED_HEAD_EPOCHS for a pretrained backbone, else 0
    head_lr: float = 3e-5
    backbone_lr_scale: float = 0.25
    patience: int = 0
    threshold_objective: str = "micro"
    class_weighting: bool = False
    seed: int = 0
    storage_options: storage.StorageOptions = field(default_factory=storage.StorageOptions)

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
            raise ValueError(f"--threshold-objective {self.threshold_objective!r}: one of {THRESHOLD_OBJECTIVES}")
        if self.resolved_head_epochs > 0 and not self.starts_pretrained:
            raise ValueError(f"--head-epochs {self.head_epochs}: a head phase needs a pretrained backbone "
                             f"(arch {self.arch!r} starts from random weights); pass --head-epochs 0")
        if self.epochs == 0 and self.resolved_head_epochs == 0:
            raise ValueError("--epochs 0 and no head phase: nothing would be trained")


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


def build_trainer(config: TrainJobConfig) -> tuple[TorchTrainer, LoopConfig]:
    config.validate()
    rows = load_training_rows(config.catalog, config.storage_options)
    train_rows, val_rows = split_rows(rows, config.val_fraction)
    if val_rows.num_rows == 0:
        raise ValueError(f"{config.catalog}: --val-fraction {config.val_fraction} leaves no validation rows")
    loop = loop_config(config, train_rows, val_rows)
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
    result = trainer.fit()
    return publish_best(result, config, loop.monitor)
