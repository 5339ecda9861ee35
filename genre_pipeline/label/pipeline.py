"""The label job's settings and its Ray Data pipeline: catalogue rows in, label rows out (night.py commits)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import ray

from genre_pipeline import cluster
from genre_pipeline.config_fields import AT_LEAST_1, FRACTION, ISO_DATE, NON_NEGATIVE, POSITIVE, check_fields, option
from genre_pipeline.data import storage
from genre_pipeline.data.catalog import catalog_dataset
from genre_pipeline.data.posters import DEFAULT_MAX_POSTER_BYTES, PosterPolicy, decode_posters, fetch_posters
from genre_pipeline.errors import JobInputError
from genre_pipeline.label import incremental
from genre_pipeline.label.actor import IncrementalLabeller
from genre_pipeline.label.contract import labels_schema
from genre_pipeline.label.sizing import (
    IO_TASK_CPUS,
    KEY_BLOCK_ROWS,
    ROW_TASK_CPUS,
    SCORE_BLOCK_ROWS,
    join_partitions,
)
from genre_pipeline.label.table import DEFAULT_TABLE, EMBEDDED_CATALOG, TableSettings, catalog_properties
from genre_pipeline.model.checkpoints import ModelMeta, PinnedModel
from genre_pipeline.model.predictor import PRECISIONS
from genre_pipeline.runtime import TORCH_WORKER_ENV
from genre_pipeline.signals.join import check_tables, join_signals

logger = logging.getLogger(__name__)

CATALOG_COLUMNS = ["movie_id", "title", "poster_uri"]
# Bounded retries: a label actor that dies (OOM, lost node) is restarted this many times, a fetch or decode task
# retried this many; a fault that keeps coming back then fails the run instead of looping all night.
ACTOR_MAX_RESTARTS = 4
TASK_MAX_RETRIES = 4
# An actor's block is retried for as long as the actor can still restart (restarts bound it): while a lost node
# is not yet declared dead each retry fails at once, and a count would run out before the node is replaced.
ACTOR_TASK_MAX_RETRIES = -1
# More posters than this failing (fetch, decode, refusal, scoring) means a systemic fault (credentials, endpoint,
# poster roots), not bad posters: the night is not committed.
DEFAULT_MAX_FAILED_FRACTION = 0.2
# A night that would drop more of the previous night's movies than this is a truncated catalogue, not a
# catalogue team's clean-up: nothing is committed unless the run says --allow-shrink.
DEFAULT_MAX_SHRINK_FRACTION = 0.1

# CPU: small batches keep each layer's activations small at the same speed (docs/performance.md). A GPU needs
# hundreds per pass to stay busy, bounded by its memory (`--batch-size` for the card).
DEFAULT_BATCH_SIZE = {"cpu": 8, "cuda": 256}


def today_utc() -> str:
    return datetime.now(timezone.utc).date().isoformat()


@dataclass(frozen=True)
class LabelConfig:
    """The label job's settings; each field's metadata is its flag in jobs/label_catalog.py."""

    catalog: str = field(metadata=option("catalogue Parquet file or directory (local or s3://)"))
    model: str = field(metadata=option(
        "checkpoint directory, or a published model folder (<storage-path>/<name>/model) whose pointer names a "
        "version; resolved once per run and its weights digest-checked"))
    output: str = field(metadata=option(
        "labels warehouse folder (local or s3://): new tables' data files, the embedded catalog and the staging "
        "of nights in progress"))
    run_date: str = field(default_factory=today_utc, metadata=option(
        "the night YYYY-MM-DD (its snapshot is tagged night-<date>); default: today in UTC", check=ISO_DATE))
    table_catalog: str = field(default=EMBEDDED_CATALOG, metadata=option(
        f"Iceberg catalog: '{EMBEDDED_CATALOG}' (SQLite beside a local --output), or the name of a catalog "
        "configured in PYICEBERG_CATALOG__<NAME>__* variables or ~/.pyiceberg.yaml (REST, Glue, SQL)"))
    table: str = field(default=DEFAULT_TABLE, metadata=option("the labels table, namespace.name"))
    full: bool = field(default=False, metadata=option(
        "score every movie, even those whose inputs did not change since the last night"))
    max_shrink_fraction: float = field(default=DEFAULT_MAX_SHRINK_FRACTION, metadata=option(
        "when the night would drop more than this fraction of the previous night's movies, nothing is committed "
        f"and the job exits 2 (default {DEFAULT_MAX_SHRINK_FRACTION:g})", check=FRACTION))
    allow_shrink: bool = field(default=False, metadata=option(
        "commit a night that drops more movies than --max-shrink-fraction (never an empty one)"))
    batch_size: int | None = field(default=None, metadata=option(
        f"images per forward pass; default {DEFAULT_BATCH_SIZE['cpu']} on CPU, {DEFAULT_BATCH_SIZE['cuda']} on GPU "
        "(lower it if the card runs out of memory)", check=AT_LEAST_1))
    # On CPUs also no more actors than the catalogue has blocks.
    actors: int | None = field(default=None, metadata=option(
        "PosterLabeller actors (model replicas); default on CPU: one per core of the cluster's nodes, "
        "single-threaded; with GPUs: the cluster's GPUs over --num-gpus-per-actor", check=AT_LEAST_1))
    num_gpus_per_actor: float = field(default=0.0, metadata=option(
        "GPUs per actor; 0 scores on CPU", check=NON_NEGATIVE))
    cpus_per_actor: float | None = field(default=None, metadata=option(
        "CPUs Ray reserves per actor; default 1 with GPUs, else the node's CPUs less "
        f"{cluster.DATA_CPU_RESERVE:g} for Ray Data's read tasks, shared by the node's actors", check=POSITIVE))
    # The reserved CPU's I/O tasks mostly wait, so the default's threads keep it busy too.
    threads_per_actor: int | None = field(default=None, metadata=option(
        "intra-op (and decode) threads per actor; default on CPU: the node's cores shared by its actors (1 with "
        "the default --actors), with GPUs: the actor's CPUs", check=AT_LEAST_1))
    start_timeout: float = field(default=cluster.DEFAULT_START_TIMEOUT_SECONDS, metadata=option(
        "seconds a joined cluster may take to offer the actors' resources, and the actors to start (model load "
        f"included); then the job exits 2, committing nothing (default {cluster.DEFAULT_START_TIMEOUT_SECONDS:g})",
        check=POSITIVE))
    precision: str = field(default="auto", metadata=option(
        "auto: bf16 autocast on GPUs, fp32 on CPUs; bf16 on CPUs is faster on AVX512-BF16 cores and moves "
        "scores slightly: compare two nights with evaluate.py", choices=PRECISIONS))
    compile_model: bool = field(default=False, metadata=option(
        "torch.compile the model in each actor (GPU runs)", name="--compile"))
    poster_roots: tuple[str, ...] = field(default=(), metadata=option(
        "a local folder or s3://bucket/prefix posters may be read from (repeatable); a poster elsewhere, after "
        "following symlinks and '..', gets status refused_poster. A local poster is then opened beneath its root "
        "without following any symlink: one whose path changes to a symlink after the check is refused too. "
        "Default: the folder or prefix the catalogue lies in", name="--poster-root", metavar="ROOT"))
    max_poster_bytes: int = field(default=DEFAULT_MAX_POSTER_BYTES, metadata=option(
        f"larger posters get status refused_poster (default {DEFAULT_MAX_POSTER_BYTES:,})", check=AT_LEAST_1))
    max_failed_fraction: float = field(default=DEFAULT_MAX_FAILED_FRACTION, metadata=option(
        "when more than this fraction of the rows with a poster_uri fail (fetch, decode, refusal, scoring), "
        "nothing is committed and the job exits 2: a systemic fault, not bad posters "
        f"(default {DEFAULT_MAX_FAILED_FRACTION:g})", check=FRACTION))
    title_embeddings: str | None = field(default=None, metadata=option(
        "a fusion model's title embeddings (jobs/embed_titles.py version folder, in the model's space); default: "
        "the table it was trained with"))
    ratings_embeddings: str | None = field(default=None, metadata=option(
        "a fusion model's ratings embeddings (the version it was trained with); default: that table"))
    storage_options: storage.StorageOptions = field(default_factory=storage.StorageOptions)  # the storage flags'

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def on_gpu(self) -> bool:
        return self.num_gpus_per_actor > 0

    @property
    def table_settings(self) -> TableSettings:
        return TableSettings(self.output, self.table_catalog, self.table, self.storage_options)

    @property
    def staging(self) -> str:
        return storage.join(self.table_settings.staging, f"run_date={self.run_date}")

    @property
    def given_tables(self) -> dict[str, str]:
        given = {"title": self.title_embeddings, "ratings": self.ratings_embeddings}
        return {signal: uri for signal, uri in given.items() if uri}


class SignalTablesError(JobInputError, ValueError):
    """Embedding tables the model cannot use: not its signals, or vectors from another space."""


def signal_tables(config: LabelConfig, meta: ModelMeta) -> dict[str, str]:
    """The embedding table of each of the model's signals: the one given, or the one it was trained with."""
    known = meta.fusion.get("embeddings", {})
    unknown = sorted(set(config.given_tables) - set(known))
    if unknown:
        raise SignalTablesError(f"model {meta.model_version} does not use {', '.join(unknown)} embeddings "
                                f"(its signals: {', '.join(meta.signals)}); drop --{unknown[0]}-embeddings")
    tables = {signal: config.given_tables.get(signal, trained["uri"]) for signal, trained in known.items()}
    for signal, embedding in check_tables(tables, config.storage_options).items():
        if embedding.space_id != known[signal]["space"]:
            raise SignalTablesError(
                f"{tables[signal]}: {signal} vectors of space {embedding.space_id}, but model {meta.model_version} "
                f"was trained on space {known[signal]['space']}: retrain the fusion model on this table, or give "
                "the table it was trained with")
    return tables


def resolve_batch_size(config: LabelConfig) -> int:
    return config.batch_size or DEFAULT_BATCH_SIZE["cuda" if config.on_gpu else "cpu"]


class ActorResourcesError(cluster.ClusterResourcesError):
    """Actors this cluster cannot hold, or could not start in time (the job would wait forever)."""


def resolve_actor_resources(config: LabelConfig, rows: int | None = None) -> cluster.ActorResources:
    """The pool's size and each actor's CPUs and threads, from the live cluster, checked to fit on its nodes;
    `rows` (the catalogue's) caps the default pool size on CPUs. A joined cluster gets --start-timeout for its
    nodes to appear (a local Ray cannot grow)."""
    wait = config.start_timeout if os.environ.get("RAY_ADDRESS") else 0.0
    return cluster.within(wait, lambda: size_label_actors(config, cluster.live_nodes(), rows))


def size_label_actors(config: LabelConfig, nodes: list[cluster.NodeResources],
                      rows: int | None) -> cluster.ActorResources:
    if config.on_gpu:
        return size_label_gpu_actors(config, nodes)
    return size_label_cpu_actors(config, cluster.node_cpus(nodes), rows)


def size_label_gpu_actors(config: LabelConfig, nodes: list[cluster.NodeResources]) -> cluster.ActorResources:
    """By default as many actors as the cluster's GPUs hold; each must fit on one node with its CPUs, beside the
    whole CPU Ray Data's read and decode tasks need."""
    actors = config.actors or cluster.gpu_pool_size(nodes, config.num_gpus_per_actor)
    cpus = config.cpus_per_actor or 1.0
    resources = cluster.ActorResources(actors, cpus, config.threads_per_actor or max(1, math.ceil(cpus)))
    cluster.check_pool(actor_pool(config, resources), nodes, error=ActorResourcesError,
                       advice="lower --actors, --num-gpus-per-actor or --cpus-per-actor, or add GPU nodes")
    return resources


def actor_pool(config: LabelConfig, resources: cluster.ActorResources) -> cluster.Pool:
    return cluster.Pool("label actor", resources.actors, resources.cpus, config.num_gpus_per_actor,
                        spare_cpus=cluster.DATA_CPU_RESERVE)


@contextlib.contextmanager
def actors_started_in_time(config: LabelConfig, resources: cluster.ActorResources) -> Iterator[None]:
    """Around the run: Ray Data's timeout waiting for the pool's actors (--start-timeout) becomes the job's
    error, naming the pool."""
    try:
        yield
    except ray.exceptions.GetTimeoutError as error:
        if "starting actors" not in str(error):
            raise
        raise ActorResourcesError(
            f"{actor_pool(config, resources).describe()} did not start within --start-timeout "
            f"{config.start_timeout:g} s: other jobs hold the cluster's resources, a node was lost or is still "
            "starting, or loading the model is slow; nothing committed") from None


def size_label_cpu_actors(config: LabelConfig, nodes: list[float], rows: int | None) -> cluster.ActorResources:
    """CPU actors on nodes of these CPU counts (cluster.size_cpu_actors): by default one single-threaded actor
    per core, but no more than the catalogue's `rows` make blocks to score."""
    max_actors = None if rows is None else math.ceil(rows / SCORE_BLOCK_ROWS)
    resources = cluster.size_cpu_actors(
        config.actors, nodes, max_actors=max_actors, cpus=config.cpus_per_actor, threads=config.threads_per_actor,
        min_cpus=0.1, work="score", advice=", or score on GPUs", error=ActorResourcesError)
    smallest, per_node = min(nodes), cluster.actors_per_node(resources.actors, nodes)
    if resources.cpus * per_node > smallest - cluster.DATA_CPU_RESERVE + 1e-9:
        raise ActorResourcesError(
            f"--cpus-per-actor {resources.cpus:g} x {per_node} actors per node leaves Ray Data less than the "
            f"{cluster.DATA_CPU_RESERVE:g} CPU its read tasks need on {smallest:g}-CPU nodes; lower it or --actors")
    return resources


def check_storage(config: LabelConfig) -> None:
    """Fail before any work or write when the model, the catalogue or the output cannot be used.

    A wrong endpoint, credential, bucket or prefix then costs seconds instead of a night's compute, and the
    StorageError names the URI and the reason; the output gets nothing (on S3 a marker is written and deleted).
    """
    options = config.storage_options
    storage.check_readable(config.model, options)
    storage.check_readable(config.catalog, options)
    for uri in config.given_tables.values():
        storage.check_readable(uri, options)
    storage.check_writable(config.output, options)
    catalog_properties(config.table_settings)  # an s3:// output with the embedded catalog: refused now


@dataclass(frozen=True)
class KnownRows:
    """The label rows a night may keep instead of scoring: the previous night's, and this night's staged ones."""

    previous: ray.data.Dataset | None = None
    staged: ray.data.Dataset | None = None


def catalog_rows(uri: str, options: storage.StorageOptions, tables: dict[str, str] | None = None,
                 rows: int | None = None) -> ray.data.Dataset:
    """The catalogue's label-job columns, with the embedding `tables` joined."""
    fs, path = storage.arrow_filesystem(uri, options)
    # The projection is pushed down into the Parquet read.
    catalog = catalog_dataset(path, fs, num_cpus=IO_TASK_CPUS).select_columns(CATALOG_COLUMNS)
    if tables:
        catalog = join_signals(catalog, tables, options, partitions=join_partitions(rows))
    return catalog


def catalog_with_known_rows(config: LabelConfig, night_digest: str, known: KnownRows,
                            tables: dict[str, str] | None = None, rows: int | None = None) -> ray.data.Dataset:
    """Catalogue rows with their input keys and the known label rows (previous night, staged) beside them."""
    options = config.storage_options
    catalog = catalog_rows(config.catalog, options, tables, rows).map_batches(
        incremental.add_input_keys, fn_kwargs={"night_digest": night_digest, "options": options},
        batch_format="pyarrow", batch_size=KEY_BLOCK_ROWS, num_cpus=ROW_TASK_CPUS, max_retries=TASK_MAX_RETRIES)
    partitions = join_partitions(rows)
    catalog = incremental.join_known_rows(catalog, known.previous, incremental.PREVIOUS, partitions)
    return incremental.join_known_rows(catalog, known.staged, incremental.STAGED, partitions)


def scoring_blocks(rows: ray.data.Dataset) -> ray.data.Dataset:
    """`rows` in blocks of exactly SCORE_BLOCK_ROWS rows (the last one: the rest). Small blocks, streamed: a
    catalogue that is one Parquet file must still feed every actor of the pool. Exact sizes: a short block would
    be bundled with the next into one call of twice the work."""
    return rows.repartition(target_num_rows_per_block=SCORE_BLOCK_ROWS, strict=True)


def poster_policy(config: LabelConfig) -> PosterPolicy:
    """The configured poster roots, or the folder the catalogue lies in (a catalogue folder's parent)."""
    roots = list(config.poster_roots) or [catalog_folder(config.catalog, config.storage_options)]
    return PosterPolicy.under(roots, config.max_poster_bytes)


def catalog_folder(uri: str, options: storage.StorageOptions) -> str:
    fs, path = storage.fsspec_filesystem(uri, options)
    parent = path.rstrip("/").rsplit("/", 1)[0]
    return f"s3://{parent}" if storage.is_remote(uri) else parent


@contextlib.contextmanager
def retry_arguments_allowed() -> Iterator[None]:
    """Ray 2.60 bounds task retries and actor restarts only through `ray_remote_args`, which it marks deprecated
    without offering named parameters for them yet: its warning would print once per night."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        yield


def build_label_dataset(
    config: LabelConfig, model: PinnedModel, resources: cluster.ActorResources, *, run_id: str, labelled_at: datetime,
    night_digest: str, known: KnownRows, tables: dict[str, str] | None = None, rows: int | None = None,
) -> ray.data.Dataset:
    """read -> input keys -> known rows joined (materialized once, in the object store) -> the rows that need
    scoring: [fetch (I/O tasks) -> decode (CPU tasks), on GPUs] -> labeller pool; the others: their known label
    rows, in tasks. No actor starts on a night with nothing to score. A night with no known rows (the table's
    first) is materialized too: streaming its keyed rows into the pool was three times slower on a 200,000-movie
    night without posters (docs/performance.md)."""
    reuse = not config.full
    with retry_arguments_allowed():
        joined = catalog_with_known_rows(config, night_digest, known, tables, rows).materialize()
    kept = joined.map_batches(incremental.kept_label_rows, batch_format="pyarrow", batch_size=None,
                              num_cpus=ROW_TASK_CPUS,
                              fn_kwargs={"reuse": reuse, "schema": labels_schema(model.meta.genres)})
    # Materialized: its count is then metadata, and the pool reads the rows without computing them again.
    to_score = joined.map_batches(incremental.rows_to_score, fn_kwargs={"reuse": reuse}, batch_format="pyarrow",
                                  batch_size=None, num_cpus=ROW_TASK_CPUS).materialize()
    if to_score.count() == 0:
        return kept
    return score_rows(to_score, config, model, resources, run_id=run_id, labelled_at=labelled_at).union(kept)


def score_rows(rows: ray.data.Dataset, config: LabelConfig, model: PinnedModel, resources: cluster.ActorResources,
               *, run_id: str, labelled_at: datetime) -> ray.data.Dataset:
    """Label rows of `rows`, scored by the labeller pool in blocks of SCORE_BLOCK_ROWS."""
    with retry_arguments_allowed():
        posters = prepare_posters(config, model, scoring_blocks(rows))
        return score_posters(posters, config, model, resources, run_id=run_id, labelled_at=labelled_at)


def prepare_posters(config: LabelConfig, model: PinnedModel, posters: ray.data.Dataset) -> ray.data.Dataset:
    if not config.on_gpu:  # CPU actors fetch and decode their own blocks
        return posters
    # The GPU actors' own CPU could not decode fast enough: decoding scales out in tasks.
    fetch_kwargs = {"options": config.storage_options, "policy": poster_policy(config)}
    return (
        posters.map_batches(fetch_posters, fn_kwargs=fetch_kwargs, batch_size=SCORE_BLOCK_ROWS,
                            num_cpus=IO_TASK_CPUS, max_retries=TASK_MAX_RETRIES)
        .map_batches(decode_posters, fn_kwargs={"image_size": model.meta.preprocess.shape},
                     batch_size=SCORE_BLOCK_ROWS, max_retries=TASK_MAX_RETRIES)
    )


def score_posters(posters: ray.data.Dataset, config: LabelConfig, model: PinnedModel, resources: cluster.ActorResources,
                  *, run_id: str, labelled_at: datetime) -> ray.data.Dataset:
    options = config.storage_options
    # Ray Data waits for the pool's actors without end by default; bounded, see actors_started_in_time.
    posters.context.wait_for_min_actors_s = math.ceil(config.start_timeout)
    return posters.map_batches(
        IncrementalLabeller,
        fn_constructor_kwargs={"model": model, "run_id": run_id, "labelled_at": labelled_at,
                               "fetch_and_decode": not config.on_gpu, "device": "cuda" if config.on_gpu else "cpu",
                               "precision": config.precision, "compile_model": config.compile_model,
                               "num_threads": resources.threads, "forward_batch": resolve_batch_size(config),
                               "storage_options": options, "poster_policy": poster_policy(config),
                               "staging": config.staging},
        batch_format="pyarrow",
        # Two calls at once per actor: one prepares its batch (on CPUs: fetch and decode) or builds its label
        # rows while the other scores (see actor.model_lock). No more: Ray Data's default queues two more
        # blocks behind a busy actor, where they wait while other actors run out of work at the run's end.
        compute=ray.data.ActorPoolStrategy(size=resources.actors, max_concurrent_calls_per_actor=2,
                                           max_tasks_in_flight_per_actor=2, enable_true_multi_threading=True),
        # On CPU a call takes a whole block (Ray Data's per-call overhead is paid per block, not per 8 posters)
        # and scores it in forward passes of --batch-size.
        batch_size=resolve_batch_size(config) if config.on_gpu else SCORE_BLOCK_ROWS,
        num_gpus=config.num_gpus_per_actor,
        num_cpus=resources.cpus,
        max_restarts=ACTOR_MAX_RESTARTS,
        max_task_retries=ACTOR_TASK_MAX_RETRIES,
        runtime_env={"env_vars": TORCH_WORKER_ENV},
    )
