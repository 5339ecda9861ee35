"""The fusion model's recipe as a library function: catalogue + embedding tables in, a fusion model published.

Rows are the train split's movies with genres, with or without a poster: the model must learn to score a movie
from whatever signals it has. Ray Data joins the embedding tables to them and fetches and decodes the posters;
Ray Train workers turn their shards into cached signals and train the fusion head (see fusion_loop). The run
itself is the trainer both recipes share (`trainer`).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field

import pyarrow as pa
import ray
from ray.train.torch import TorchTrainer

from genre_pipeline.config_fields import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, check_fields, option
from genre_pipeline.cuda_guard import PROBE_TIMEOUT_SECONDS
from genre_pipeline.data import storage
from genre_pipeline.data.posters import decode_posters, fetch_posters
from genre_pipeline.errors import ConfigError
from genre_pipeline.evaluate.metrics import THRESHOLD_OBJECTIVES
from genre_pipeline.genres import GENRES
from genre_pipeline.model.architectures import PRETRAINED_ARCHS, default_preprocess, lite_backbone, weights_source
from genre_pipeline.model.signals import POSTER, SIGNAL_ORDER
from genre_pipeline.signals.embeddings import EmbeddingMeta, file_uri
from genre_pipeline.signals.join import check_tables, join_signals
from genre_pipeline.train.fitting import TRAIN_DATASET, VAL_DATASET
from genre_pipeline.train.fusion_loop import MONITOR, FusionLoopConfig, fusion_loop_per_worker
from genre_pipeline.train.rows import fingerprint, load_training_rows, with_targets
from genre_pipeline.train.trainer import (
    DEFAULT_ARCH,
    RESOURCE_WAIT_SECONDS,
    VAL_FRACTION,
    TrainSummary,
    build_torch_trainer,
    check_before_start,
    run_settings,
    split_for_training,
    train_and_publish,
)

logger = logging.getLogger(__name__)

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
        check=VAL_FRACTION))
    threshold_objective: str = field(default="micro", metadata=option(
        "the F1 each signal subset's thresholds maximise", choices=THRESHOLD_OBJECTIVES))
    seed: int = field(default=0, metadata=option("torch seed"))
    storage_options: storage.StorageOptions = field(default_factory=storage.StorageOptions)  # the storage flags'

    def __post_init__(self) -> None:
        check_fields(self)
        if len(self.signals) < 2:
            raise ConfigError(f"signals {self.signals}: a fusion model needs at least two of poster, "
                              "--title-embeddings, --ratings-embeddings (a poster alone: jobs/train_genre_model.py)")

    @property
    def start_timeout(self) -> float:
        """How long a joined cluster may take to offer the workers' resources, and Ray Train to place them."""
        return RESOURCE_WAIT_SECONDS

    @property
    def tables(self) -> dict[str, str]:
        given = {"title": self.title_embeddings, "ratings": self.ratings_embeddings}
        return {signal: uri for signal, uri in given.items() if uri}

    @property
    def signals(self) -> tuple[str, ...]:
        return tuple(s for s in SIGNAL_ORDER if s in self.tables or (s == POSTER and self.poster))


def to_dataset(rows: pa.Table, config: FusionJobConfig, loop: FusionLoopConfig) -> ray.data.Dataset:
    """Joined signals, then fetched and decoded posters (a movie without one gets a status, not an error)."""
    rows = with_targets(rows, GENRES)
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


def build_trainer(config: FusionJobConfig) -> TorchTrainer:
    metas = check_tables(config.tables, config.storage_options)
    rows = load_training_rows(config.catalog, config.storage_options, needs_poster=False)
    train_rows, val_rows = split_for_training(config, rows)
    loop = loop_config(config, metas, train_rows, val_rows)
    # A run name is re-run only with the data, tables and settings its checkpoint was made with.
    settings = run_settings(loop.arch, loop.data_fingerprint, loop.preprocess.image_size, loop.threshold_objective,
                            {name: getattr(loop, name) for name in RECIPE}, signals=loop.signals,
                            table_versions={signal: loop.embeddings[signal]["version"]
                                            for signal in sorted(loop.embeddings)})
    check_before_start(config, settings, RESUME_FIXED, PROBE_TIMEOUT_SECONDS)
    logger.info("fusion of %s: training on %d movies, validating on %d", "+".join(loop.signals),
                train_rows.num_rows, val_rows.num_rows)
    # Both datasets split whole across the workers: each rank caches its part and all ranks gather it.
    datasets = {TRAIN_DATASET: to_dataset(train_rows, config, loop), VAL_DATASET: to_dataset(val_rows, config, loop)}
    return build_torch_trainer(config, fusion_loop_per_worker, loop, monitor=MONITOR, checkpoints_kept=1,
                               datasets=datasets, whole=(TRAIN_DATASET, VAL_DATASET))


def run_fusion_training(config: FusionJobConfig) -> TrainSummary:
    return train_and_publish(build_trainer(config), config, MONITOR)
