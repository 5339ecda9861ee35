"""The nightly label job as a library function: catalogue in, one committed partition of labels out."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow.parquet as pq
import ray

from genre_pipeline import storage
from genre_pipeline.catalog import CatalogError, check_movie_ids, validate_schema
from genre_pipeline.checkpoints import ModelMeta, read_meta
from genre_pipeline.inference import GenrePredictor
from genre_pipeline.labels import STATUS_OK, to_label_table
from genre_pipeline.output import NightOutput
from genre_pipeline.posters import decode_posters, fetch_posters

logger = logging.getLogger(__name__)

CATALOG_COLUMNS = ["movie_id", "title", "poster_uri"]
# Rows per block and per fetch/decode task: enough to amortise task overhead, small enough that a block of
# decoded 224px images (~150 KB each) stays around 20 MB in the object store and that even a small
# catalogue splits into enough blocks to keep every actor busy.
DECODE_BATCH_ROWS = 128


@dataclass(frozen=True)
class LabelConfig:
    catalog: str
    model: str
    output: str
    run_date: str
    batch_size: int = 64  # images per forward pass; the model's sweet spot on CPU and a safe start on GPUs
    actors: int = 1
    num_gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    storage_options: storage.StorageOptions = field(default_factory=storage.StorageOptions)


@dataclass(frozen=True)
class LabelSummary:
    output_uri: str
    run_id: str
    model_version: str
    rows_by_status: dict[str, int]
    seconds: float

    @property
    def rows(self) -> int:
        return sum(self.rows_by_status.values())

    @property
    def posters_per_second(self) -> float:
        return self.rows_by_status.get(STATUS_OK, 0) / self.seconds if self.seconds else 0.0


def check_storage(config: LabelConfig) -> None:
    """Fail before any work or write when the model, the catalogue or the output cannot be used.

    A wrong endpoint, credential, bucket or prefix then costs seconds instead of a night's compute, and the
    StorageError names the URI and the reason; the output gets nothing (on S3 a marker is written and deleted).
    """
    options = config.storage_options
    storage.check_readable(config.model, options)
    storage.check_readable(config.catalog, options)
    storage.check_writable(config.output, options)


def count_catalog_rows(uri: str, options: storage.StorageOptions) -> int:
    """Fail fast on a malformed catalogue: schema and unique movie_ids, reading only the id column."""
    fs, path = storage.arrow_filesystem(uri, options)
    try:
        dataset = pq.ParquetDataset(path, filesystem=fs)
        schema = dataset.schema
    except (OSError, ValueError) as error:
        raise CatalogError(f"{uri}: cannot read the catalogue: {error}") from None
    validate_schema(schema, source=uri)
    ids = dataset.read(columns=["movie_id"]).column("movie_id")
    check_movie_ids(ids, source=uri)
    return len(ids)


def build_label_dataset(
    config: LabelConfig, meta: ModelMeta, *, run_id: str, labelled_at: datetime
) -> ray.data.Dataset:
    """read -> fetch -> decode+resize (CPU tasks) -> GenrePredictor pool -> label rows; lazy, streaming."""
    options = config.storage_options
    fs, path = storage.arrow_filesystem(config.catalog, options)
    return (
        ray.data.read_parquet(path, filesystem=fs)
        .select_columns(CATALOG_COLUMNS)  # projection is pushed down into the Parquet read
        # Small blocks, streamed: a catalogue that is one Parquet file must still feed every actor of the pool.
        .repartition(target_num_rows_per_block=DECODE_BATCH_ROWS)
        .map_batches(fetch_posters, fn_kwargs={"options": options}, batch_size=DECODE_BATCH_ROWS)
        .map_batches(decode_posters, fn_kwargs={"image_size": meta.preprocess.image_size},
                     batch_size=DECODE_BATCH_ROWS)
        .map_batches(
            GenrePredictor,
            fn_constructor_kwargs={"checkpoint_uri": config.model, "storage_options": options,
                                   "device": "cuda" if config.num_gpus_per_actor > 0 else "cpu"},
            compute=ray.data.ActorPoolStrategy(size=config.actors),
            batch_size=config.batch_size,
            num_gpus=config.num_gpus_per_actor,
            num_cpus=config.cpus_per_actor,
        )
        .map_batches(
            to_label_table,
            fn_kwargs={"genres": meta.genres, "thresholds": meta.threshold_array,
                       "model_version": meta.model_version, "run_id": run_id, "labelled_at": labelled_at},
            batch_size=DECODE_BATCH_ROWS,
        )
    )


def label_catalog(config: LabelConfig) -> LabelSummary:
    """Label every catalogue row and commit the night's partition; nothing is committed on failure."""
    started = time.monotonic()
    check_storage(config)
    meta = read_meta(config.model, config.storage_options)  # fail before any work when the model is unreadable
    expected_rows = count_catalog_rows(config.catalog, config.storage_options)
    run_id = f"{config.run_date}-{uuid.uuid4().hex[:8]}"
    night = NightOutput(config.output, config.run_date, run_id, config.storage_options)
    night.clean_stale()
    labels = build_label_dataset(config, meta, run_id=run_id, labelled_at=datetime.now(timezone.utc))
    fs, staging_path = storage.arrow_filesystem(night.staging_uri, config.storage_options)
    labels.write_parquet(staging_path, filesystem=fs)
    rows_by_status = night.check_complete(expected_rows)
    night.commit()
    return LabelSummary(night.partition_uri, run_id, meta.model_version, rows_by_status,
                        time.monotonic() - started)
