"""The fusion training job as a library function: catalogue + embedding tables in, a fusion model published.

Rows are the train split's movies with genres, with or without a poster: the model must learn to score a movie
from whatever signals it has. Ray Data joins the embedding tables to them and fetches and decodes the posters;
Ray Train workers turn their shards into cached signals and train the fusion head (see fusion_loop).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
from ray.train.torch import TorchTrainer

from genre_pipeline.config_fields import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, check_fields, option
from genre_pipeline.cuda_guard import check_gpu_workers
from genre_pipeline.data import storage
from genre_pipeline.data.catalog import CatalogError, read_catalog
from genre_pipeline.data.posters import decode_posters, fetch_posters
from genre_pipeline.errors import ConfigError
from genre_pipeline.evaluate.metrics import THRESHOLD_OBJECTIVES
from genre_pipeline.genres import GENRES, encode_many
from genre_pipeline.model.architectures import PRETRAINED_ARCHS, default_preprocess, lite_backbone, weights_source
from genre_pipeline.model.signals import POSTER, SIGNAL_ORDER
from genre_pipeline.runtime import TORCH_WORKER_ENV
from genre_pipeline.signals.embeddings import EmbeddingMeta, file_uri
from genre_pipeline.signals.join import check_tables, join_signals
from genre_pipeline.train.data import fingerprint, split_rows
from genre_pipeline.train.driver import (
    DEFAULT_ARCH,
    RESOURCE_WAIT_SECONDS,
    TrainSummary,
    WholeValidationSplit,
    check_resources,
    check_settings_unchanged,
    failure_config,
    fit_within,
    publish_best,
)
from genre_pipeline.train.fusion_loop import (
    MONITOR,
    TRAIN_DATASET,
    VAL_DATASET,
    FusionLoopConfig,
    fusion_loop_per_worker,
)

logger = logging.getLogger(__name__)

FUSION_COLUMNS = ["movie_id", "poster_uri", "genres"]
ROWS_PER_BLOCK = 64
# The head's recipe, as the checkpoint's meta records it (fusion_loop.fusion_meta).
RECIPE = ("hidden", "dropout", "signal_dropout", "epochs", "patience", "lr", "weight_decay", "seed")
# Settings a re-run of a run name must share with its checkpoint. Each run trains the head from scratch, but
# Ray Train keeps the run's best checkpoint and publish_best picks among them: a checkpoint of other data,
# tables or settings could be published in place of the new one. So every setting that makes the model is fixed.
RESUME_FIXED = ("arch", "data_fingerprint", "image_size", "threshold_objective", "signals", "embeddings", *RECIPE)


@dataclass(frozen=True)
class FusionJobConfig:
    """The fusion training job's settings; each field's metadata is its flag in jobs/train_fusion_model.py."""

    catalog: str = field(metadata=option("catalogue Parquet (local or s3://)"))
    storage_path: str = field(metadata=option("where Ray Train keeps runs and checkpoints"))
    name: str = field(metadata=option(
        "run name; the model goes to <storage-path>/<name>/model. A name is re-run only with the settings, data "
        "and embedding tables it was trained with"))
    title_embeddings: str | None = field(default=None, metadata=option(
        "title embedding version folder (jobs/embed_titles.py); adds the title signal"))
    ratings_embeddings: str | None = field(default=None, metadata=option(
        "ratings embedding version folder (jobs/embed_ratings.py); adds the ratings signal"))
    poster: bool = field(default=True, metadata=option(
        "use the poster signal (a frozen ImageNet backbone's features)", action=argparse.BooleanOptionalAction))
    arch: str = field(default=DEFAULT_ARCH, metadata=option(
        "the poster backbone, ImageNet-pretrained from its package", choices=PRETRAINED_ARCHS))
    image_size: int | None = field(default=None, metadata=option(
        "poster width in pixels (height 1.5 x width); default: the backbone's", check=AT_LEAST_1))
    hidden: int = field(default=256, metadata=option("width of the fused representation", check=AT_LEAST_1))
    dropout: float = field(default=0.3, metadata=option("dropout in the encoders and classifier", check=FRACTION))
    signal_dropout: float = field(default=0.5, metadata=option(
        "chance each present signal is hidden from a training row (modality dropout)", check=FRACTION))
    epochs: int = field(default=200, metadata=option("epochs over the cached signals", check=AT_LEAST_1))
    patience: int = field(default=30, metadata=option(
        "stop after N epochs without a better validation score (mean mAP@3 over signal subsets)"))
    lr: float = field(default=1e-3, metadata=option("AdamW LR", check=POSITIVE))
    weight_decay: float = field(default=1e-2, metadata=option("AdamW weight decay", check=NON_NEGATIVE))
    batch_size: int = field(default=32, metadata=option("posters per backbone pass", check=AT_LEAST_1))
    num_workers: int = field(default=2, metadata=option("Ray Train workers", check=AT_LEAST_1))
    use_gpu: bool = field(default=False, metadata=option("one GPU per worker"))
    cpus_per_worker: float = field(default=0.5, metadata=option("CPUs reserved per worker", check=POSITIVE))
    val_fraction: float = field(default=0.15, metadata=option(
        "share of train movies held out for validation, by a stable hash of movie_id (the poster model's split)",
        check=FRACTION))
    threshold_objective: str = field(default="micro", metadata=option(
        "the F1 each signal subset's thresholds maximise", choices=THRESHOLD_OBJECTIVES))
    seed: int = field(default=0, metadata=option("torch seed"))
    storage_options: storage.StorageOptions = field(default_factory=storage.StorageOptions)  # the storage flags'

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def tables(self) -> dict[str, str]:
        given = {"title": self.title_embeddings, "ratings": self.ratings_embeddings}
        return {signal: uri for signal, uri in given.items() if uri}

    @property
    def signals(self) -> tuple[str, ...]:
        return tuple(s for s in SIGNAL_ORDER if s in self.tables or (s == POSTER and self.poster))

    def validate(self) -> None:
        if len(self.signals) < 2:
            raise ConfigError(f"signals {self.signals}: a fusion model needs at least two of poster, "
                              "--title-embeddings, --ratings-embeddings (a poster alone: jobs/train_genre_model.py)")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction {self.val_fraction}: must be between 0 and 1")


def load_rows(config: FusionJobConfig) -> pa.Table:
    """Train-split movies with genres (posters optional), their genres as multi-hot `target`."""
    table = read_catalog(config.catalog, config.storage_options)
    if "split" not in table.column_names or "genres" not in table.column_names:
        raise CatalogError(f"{config.catalog}: training needs the columns 'split' and 'genres'")
    keep = pc.and_(pc.equal(table["split"], "train"),
                   pc.greater(pc.fill_null(pc.list_value_length(table["genres"]), 0), 0))
    rows = table.filter(keep).select(FUSION_COLUMNS)
    if rows.num_rows == 0:
        raise CatalogError(f"{config.catalog}: no rows with split == 'train' and genres")
    return rows


def with_targets(rows: pa.Table) -> pa.Table:
    targets = encode_many(rows["genres"].to_pylist(), GENRES)
    column = pa.FixedSizeListArray.from_arrays(pa.array(targets.reshape(-1), pa.float32()), len(GENRES))
    return rows.drop_columns(["genres"]).append_column("target", column)


def to_dataset(rows: pa.Table, config: FusionJobConfig, loop: FusionLoopConfig) -> ray.data.Dataset:
    """Joined signals, then fetched and decoded posters (a movie without one gets a status, not an error)."""
    rows = with_targets(rows)
    blocks = [rows.slice(start, ROWS_PER_BLOCK) for start in range(0, rows.num_rows, ROWS_PER_BLOCK)]
    dataset = join_signals(ray.data.from_arrow(blocks), config.tables, config.storage_options,
                           partitions=max(1, len(blocks) // 4))
    return (dataset
            .map_batches(fetch_posters, fn_kwargs={"options": config.storage_options}, batch_size=ROWS_PER_BLOCK)
            .map_batches(decode_posters, fn_kwargs={"image_size": loop.preprocess.shape}, batch_size=ROWS_PER_BLOCK))


def table_record(uri: str, meta: EmbeddingMeta) -> dict:
    return {"uri": file_uri(uri), "version": meta.version, "space": meta.space_id, "dim": meta.dim,
            "method": meta.method}


def loop_config(config: FusionJobConfig, metas: dict[str, EmbeddingMeta], train: pa.Table,
                val: pa.Table) -> FusionLoopConfig:
    dims = {signal: meta.dim for signal, meta in metas.items()}
    if config.poster:
        dims[POSTER] = lite_backbone(config.arch, imagenet=False).feature_width
    return FusionLoopConfig(
        arch=config.arch, genres=list(GENRES), preprocess=default_preprocess(config.arch, config.image_size),
        signals=config.signals, dims=dims,
        embeddings={signal: table_record(config.tables[signal], meta) for signal, meta in metas.items()},
        hidden=config.hidden, dropout=config.dropout, signal_dropout=config.signal_dropout, epochs=config.epochs,
        patience=config.patience, lr=config.lr, weight_decay=config.weight_decay, batch_size=config.batch_size,
        threshold_objective=config.threshold_objective, seed=config.seed,
        data_fingerprint=fingerprint(train, val),
        weights_source=weights_source(arch=config.arch, pretrained=config.poster, weights=None,
                                      options=config.storage_options) if config.poster else {"kind": "none"},
        storage_options=config.storage_options)


def check_resume(config: FusionJobConfig, loop: FusionLoopConfig) -> None:
    """A run name is re-run only with the data, tables and settings its checkpoint was made with."""
    now = {"arch": loop.arch, "data_fingerprint": loop.data_fingerprint, "image_size": loop.preprocess.image_size,
           "threshold_objective": loop.threshold_objective, "signals": list(loop.signals),
           "embeddings": {signal: loop.embeddings[signal]["version"] for signal in sorted(loop.embeddings)},
           **{name: getattr(loop, name) for name in RECIPE}}
    check_settings_unchanged(config, now, RESUME_FIXED)


class WholeShards(WholeValidationSplit):
    """Both datasets split whole across the workers: each rank caches its part and all ranks gather it."""

    WHOLE = (TRAIN_DATASET, VAL_DATASET)


def build_trainer(config: FusionJobConfig) -> TorchTrainer:
    config.validate()
    metas = check_tables(config.tables, config.storage_options)
    train_rows, val_rows = split_rows(load_rows(config), config.val_fraction)
    if val_rows.num_rows == 0:
        raise ConfigError(f"{config.catalog}: --val-fraction {config.val_fraction} leaves no validation rows")
    loop = loop_config(config, metas, train_rows, val_rows)
    check_resume(config, loop)
    check_resources(config, RESOURCE_WAIT_SECONDS if os.environ.get("RAY_ADDRESS") else 0)
    if config.use_gpu:  # a node whose driver cannot run the image's CUDA fails here, not in the first step
        check_gpu_workers()
    logger.info("fusion of %s: training on %d movies, validating on %d", "+".join(loop.signals),
                train_rows.num_rows, val_rows.num_rows)
    fs, path = storage.arrow_filesystem(config.storage_path, config.storage_options)
    return TorchTrainer(
        fusion_loop_per_worker,
        train_loop_config={"config": loop, "cpus_per_worker": config.cpus_per_worker},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=config.name, storage_path=path, storage_filesystem=fs,
            worker_runtime_env={"env_vars": TORCH_WORKER_ENV},
            failure_config=failure_config(),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=MONITOR, checkpoint_score_order="max")),
        datasets={TRAIN_DATASET: to_dataset(train_rows, config, loop), VAL_DATASET: to_dataset(val_rows, config, loop)},
        dataset_config=WholeShards(),
    )


def run_fusion_training(config: FusionJobConfig) -> TrainSummary:
    return publish_best(fit_within(build_trainer(config), config, RESOURCE_WAIT_SECONDS), config, MONITOR)

