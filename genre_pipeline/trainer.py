"""The training job as a library function: catalogue in, Ray Train run, best checkpoint published."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import ray.train
from ray.train.torch import TorchTrainer

from genre_pipeline import storage
from genre_pipeline.checkpoints import META_FILE, ModelMeta, copy_checkpoint
from genre_pipeline.genres import GENRES
from genre_pipeline.images import PreprocessSpec
from genre_pipeline.models import DEFAULT_IMAGE_SIZE
from genre_pipeline.runtime import TORCH_WORKER_ENV
from genre_pipeline.training import TRAIN_DATASET, VAL_DATASET, LoopConfig, train_loop_per_worker
from genre_pipeline.training_data import (
    fingerprint,
    load_training_rows,
    positive_weights,
    split_rows,
    to_dataset,
)

logger = logging.getLogger(__name__)

PUBLISHED_MODEL_DIR = "model"  # <storage-path>/<name>/model: the stable URI the label job reads


@dataclass(frozen=True)
class TrainJobConfig:
    catalog: str
    storage_path: str
    name: str
    arch: str = "cnn"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    val_fraction: float = 0.15
    image_size: int | None = None
    pretrained: bool = False
    weights: str | None = None
    freeze_backbone_epochs: int = 0
    backbone_lr_scale: float = 0.1
    patience: int = 0
    class_weighting: bool = True
    seed: int = 0
    storage_options: storage.StorageOptions = field(default_factory=storage.StorageOptions)


@dataclass(frozen=True)
class TrainSummary:
    model_uri: str
    meta: ModelMeta
    epochs_run: int


def loop_config(config: TrainJobConfig, train_rows, val_rows) -> LoopConfig:
    image_size = config.image_size or DEFAULT_IMAGE_SIZE[config.arch]
    return LoopConfig(
        arch=config.arch, genres=list(GENRES), preprocess=PreprocessSpec(image_size=image_size),
        epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, weight_decay=config.weight_decay,
        backbone_lr_scale=config.backbone_lr_scale, freeze_backbone_epochs=config.freeze_backbone_epochs,
        pos_weight=positive_weights(train_rows, GENRES) if config.class_weighting else None,
        patience=config.patience, pretrained=config.pretrained, weights=config.weights, seed=config.seed,
        data_fingerprint=fingerprint(train_rows, val_rows), storage_options=config.storage_options,
    )


def build_trainer(config: TrainJobConfig) -> tuple[TorchTrainer, LoopConfig]:
    rows = load_training_rows(config.catalog, config.storage_options)
    train_rows, val_rows = split_rows(rows, config.val_fraction)
    if val_rows.num_rows == 0:
        raise ValueError(f"{config.catalog}: --val-fraction {config.val_fraction} leaves no validation rows")
    loop = loop_config(config, train_rows, val_rows)
    logger.info("training on %d posters, validating on %d", train_rows.num_rows, val_rows.num_rows)
    size = loop.preprocess.image_size
    datasets = {
        TRAIN_DATASET: to_dataset(train_rows, genres=loop.genres, image_size=size, augment=True,
                            options=config.storage_options),
        VAL_DATASET: to_dataset(val_rows, genres=loop.genres, image_size=size, augment=False,
                          options=config.storage_options),
    }
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
    """Training rows split equally, validation rows split whole. DDP steps every rank in lockstep, so each needs
    the same number of training batches (Ray's `equal=True` split drops up to world_size - 1 rows for that). The
    validation shards are only gathered at the end: dropping rows there would score each epoch, and tune the
    thresholds, on a different subset of the validation set."""

    def configure(self, datasets: dict[str, ray.data.Dataset], world_size: int, worker_handles: list | None,
                  worker_node_ids: list | None, **kwargs) -> list[dict[str, ray.data.DataIterator]]:
        equal = {name: ds for name, ds in datasets.items() if name != VAL_DATASET}
        shards = super().configure(equal, world_size, worker_handles, worker_node_ids, **kwargs)
        if VAL_DATASET in datasets:
            val = datasets[VAL_DATASET].copy(datasets[VAL_DATASET])
            val.context.execution_options = self.default_ingest_options()
            for shard, split in zip(shards, val.streaming_split(world_size, equal=False), strict=True):
                shard[VAL_DATASET] = split
        return shards


def publish_best(result: ray.train.Result, config: TrainJobConfig, monitor: str) -> TrainSummary:
    """Copy the best checkpoint to <storage-path>/<name>/model, the stable URI nightly labelling reads."""
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if monitor in m]
    if not scored:
        raise RuntimeError(f"training run {config.name!r} produced no checkpoint")
    best, _ = max(scored, key=lambda pair: pair[1][monitor])
    target = storage.join(config.storage_path, config.name, PUBLISHED_MODEL_DIR)
    with best.as_directory() as directory:
        copy_checkpoint(directory, target, config.storage_options)
        meta = ModelMeta.from_json((Path(directory) / META_FILE).read_text())
    # The last report (not the kept checkpoints, which may omit it) says how far the run went.
    epochs_run = int((result.metrics or {}).get("epoch", max(int(m.get("epoch", 0)) for _, m in scored)))
    return TrainSummary(target, meta, epochs_run)


def run_training(config: TrainJobConfig) -> TrainSummary:
    trainer, loop = build_trainer(config)
    result = trainer.fit()
    return publish_best(result, config, loop.monitor)
