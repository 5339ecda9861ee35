"""The title signal's job: catalogue titles embedded with all-MiniLM-L6-v2, offline, written as versioned embeddings.

    catalogue (movie_id, title) -> normalise_title -> TitleEmbedder actors (mean pooling, L2) -> write_embeddings

The text is normalised in title_text.py, the model found and run in title_encoder.py (nothing is downloaded at
run time). A movie whose title is null or empty gets no row: the consumer reads a missing row as "no title
signal".
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import ray

from genre_pipeline import cluster
from genre_pipeline.config_fields import AT_LEAST_1, check_fields, option
from genre_pipeline.data import storage
from genre_pipeline.data.catalog import catalog_dataset, count_catalog_rows
from genre_pipeline.errors import ConfigError
from genre_pipeline.runtime import TORCH_WORKER_ENV
from genre_pipeline.signals.embeddings import EmbeddingMeta, write_embeddings
from genre_pipeline.signals.title_encoder import (
    DEFAULT_BATCH_SIZE,
    MODEL_NAME,
    MODEL_PACKAGE,
    OFFLINE_ENV,
    TitleEmbedder,
    max_seq_length,
    model_dim,
    model_label,
    model_sha256,
    output_schema,
    resolve_model_dir,
    set_offline_env,
)
from genre_pipeline.signals.title_text import NORMALISATION_VERSION

logger = logging.getLogger(__name__)

CATALOG_COLUMNS = ["movie_id", "title"]
# Titles per block fed to the TitleEmbedder actors: a few blocks per actor so the pool shares a one-file
# catalogue; Ray's per-call cost is paid per block, and 256 short titles take well under a second.
EMBED_BLOCK_ROWS = 256


@dataclass(frozen=True)
class TitleEmbeddingConfig:
    """The title embedding job's settings; each field's metadata is its flag in jobs/embed_titles.py."""

    catalog: str = field(metadata=option("catalogue Parquet file or directory (local or s3://); needs movie_id, title"))
    out: str = field(metadata=option("embeddings root; the run goes to <out>/version=<version>/embeddings.parquet"))
    actors: int = field(default=1, metadata=option(
        "TitleEmbedder actors (model replicas); each gets the node's CPUs less one for Ray Data's read, and as "
        "many torch threads as the node's cores shared by its actors", check=AT_LEAST_1))
    batch_size: int = field(default=DEFAULT_BATCH_SIZE, metadata=option(
        f"titles per forward pass (default {DEFAULT_BATCH_SIZE})", check=AT_LEAST_1))
    model_dir: str | None = field(default=None, metadata=option(
        f"a local sentence-transformers folder (mean pooling); default: {MODEL_NAME} from the {MODEL_PACKAGE} "
        "package"))
    storage_options: storage.StorageOptions = field(default_factory=storage.StorageOptions)  # the storage flags'

    def __post_init__(self) -> None:
        check_fields(self)


def size_embedders(config: TitleEmbeddingConfig) -> cluster.ActorResources:
    """The TitleEmbedder actors on the live nodes: they share the smallest node's CPUs less Ray Data's; their
    threads use all its cores, because the read is over within a second of the start and its CPU then idles."""
    return cluster.size_cpu_actors(config.actors, cluster.node_cpus(cluster.live_nodes()), work="embed",
                                   error=ConfigError)


def check_inputs(config: TitleEmbeddingConfig) -> int:
    """Before any work: the model, the catalogue and the output root are usable; the catalogue's rows."""
    resolve_model_dir(config.model_dir)
    storage.check_readable(config.catalog, config.storage_options)
    storage.check_writable(config.out, config.storage_options)
    return count_catalog_rows(config.catalog, config.storage_options, required=CATALOG_COLUMNS)


def title_dataset(config: TitleEmbeddingConfig, size: cluster.ActorResources) -> ray.data.Dataset:
    fs, path = storage.arrow_filesystem(config.catalog, config.storage_options)
    return (
        catalog_dataset(path, fs)
        .select_columns(CATALOG_COLUMNS)
        .repartition(target_num_rows_per_block=EMBED_BLOCK_ROWS)  # a one-file catalogue still feeds every actor
        .map_batches(
            TitleEmbedder, batch_format="pyarrow", batch_size=EMBED_BLOCK_ROWS,
            fn_constructor_kwargs={"model_dir": config.model_dir, "num_threads": size.threads,
                                   "batch_size": config.batch_size},
            compute=ray.data.ActorPoolStrategy(size=size.actors), num_cpus=size.cpus,
            runtime_env={"env_vars": {**TORCH_WORKER_ENV, **OFFLINE_ENV}},
        )
    )


def gather(dataset: ray.data.Dataset, dim: int) -> pa.Table:
    """All rows on the driver as Arrow blocks, sorted by movie_id: 384 float32 (1.5 KB) a movie, 6 MB for
    MovieLens' 3,883 and 150 MB for 100,000 movies, so gathering is fine at catalogue sizes."""
    blocks = [block for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow") if block.num_rows]
    table = pa.concat_tables(blocks) if blocks else output_schema(dim).empty_table()
    return table.take(pc.sort_indices(table, [("movie_id", "ascending")]))


def titles_digest(table: pa.Table) -> str:
    """Digest of the sorted (movie_id, normalised title) pairs: the version moves only when a title does."""
    digest = hashlib.sha256()
    for movie_id, title in zip(table.column("movie_id").to_pylist(), table.column("title").to_pylist(), strict=True):
        digest.update(f"{movie_id}\t{title}\n".encode())
    return digest.hexdigest()


def embedding_meta(config: TitleEmbeddingConfig, table: pa.Table, folder: Path) -> EmbeddingMeta:
    weights = model_sha256(folder)
    fingerprint = hashlib.sha256(f"titles={titles_digest(table)} model={weights}".encode()).hexdigest()
    name = model_label(folder, packaged=config.model_dir is None)
    return EmbeddingMeta(
        signal="title", dim=model_dim(folder), method=f"{name} mean pooling, L2-normalised",
        params={"model": name, "model_sha256": weights, "max_seq_length": max_seq_length(folder)},
        source=config.catalog, source_fingerprint=fingerprint, rows=table.num_rows,
        # Any catalogue's titles land in the same space: the model's weights and title_text's normalisation.
        space=f"title:{NORMALISATION_VERSION}:{weights[:16]}")


def embed_titles(config: TitleEmbeddingConfig) -> tuple[str, int, float]:
    """Embed every titled movie of the catalogue and write one version; (version folder, rows, seconds)."""
    started = time.monotonic()
    set_offline_env()
    catalog_rows = check_inputs(config)
    folder = resolve_model_dir(config.model_dir)
    table = gather(title_dataset(config, size_embedders(config)), model_dim(folder))
    if catalog_rows - table.num_rows:
        logger.warning("%d of %d catalogue movies have no title: no title row for them",
                       catalog_rows - table.num_rows, catalog_rows)
    meta = embedding_meta(config, table, folder)
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, meta.dim)
    version = write_embeddings(config.out, table.column("movie_id").to_numpy(), vectors, meta,
                               config.storage_options)
    return version, table.num_rows, time.monotonic() - started
