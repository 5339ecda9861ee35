"""The driver side both training recipes share (Ray's driver / `train_loop_per_worker` split): the checks before a
run starts (resume, resources, GPUs), the `TorchTrainer` (scaling, run and checkpoint config), the bounded start,
and publishing the best checkpoint. A recipe (`driver`: the poster model, `fusion_driver`: the fusion model) brings
its rows, datasets, worker loop and settings.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import ray
import ray.train
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

from genre_pipeline import cluster
from genre_pipeline.config_fields import Check
from genre_pipeline.cuda_guard import check_gpu_workers
from genre_pipeline.data import storage
from genre_pipeline.errors import ConfigError, JobInputError
from genre_pipeline.model.checkpoints import META_FILE, ModelMeta, publish_checkpoint
from genre_pipeline.runtime import TORCH_WORKER_ENV
from genre_pipeline.train.rows import split_rows

DEFAULT_ARCH = "efficientnet_lite0"  # both recipes' default backbone: the recommended one
# --val-fraction: a share of the rows, neither none nor all of them.
VAL_FRACTION = Check(lambda value: 0 < value < 1, "must be between 0 and 1 (both excluded)")
PUBLISHED_MODEL_DIR = "model"  # <storage-path>/<name>/model: the stable URI the label job reads
# A lost worker (OOM, preempted node) restarts the workers from the last checkpoint this many times.
MAX_WORKER_FAILURES = 3
# How long a joined cluster may take to offer the workers' resources (KubeRay worker pods still starting).
RESOURCE_WAIT_SECONDS = cluster.DEFAULT_START_TIMEOUT_SECONDS
# A start that could not place the workers (or lost one while they started) is retried this many times; then
# the run fails, instead of Ray Train's default of retrying for ever.
MAX_START_FAILURES = 1


class TrainResourcesError(cluster.ClusterResourcesError):
    """Workers the cluster cannot hold beside Ray Data's decoding, or could not place in time: the run would
    wait forever."""


class ResumeMismatchError(JobInputError, ValueError):
    """A run name resumed with settings or data that differ from its checkpoints."""


class TrainWorkers(Protocol):
    """The worker settings of a training job's config."""

    @property
    def num_workers(self) -> int: ...

    @property
    def cpus_per_worker(self) -> float: ...

    @property
    def use_gpu(self) -> bool: ...


class TrainRun(Protocol):
    """Where a training job keeps a run."""

    @property
    def storage_path(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def storage_options(self) -> storage.StorageOptions: ...


class TrainJob(TrainWorkers, TrainRun, Protocol):
    """What the shared trainer builder needs of a recipe's config: `TrainJobConfig` and `FusionJobConfig` are one."""

    @property
    def catalog(self) -> str: ...

    @property
    def val_fraction(self) -> float: ...

    @property
    def start_timeout(self) -> float:
        """Seconds a joined cluster may take to offer the workers' resources, and Ray Train to place them."""


@dataclass(frozen=True)
class TrainSummary:
    model_uri: str
    meta: ModelMeta
    epochs_run: int


# --- before the run: data split, resume, resources -----------------------------------------------------------------

def split_for_training(config: TrainJob, rows: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(train, validation) rows by the stable split; a split that leaves no validation rows is refused."""
    train_rows, val_rows = split_rows(rows, config.val_fraction)
    if val_rows.num_rows == 0:
        raise ConfigError(f"{config.catalog}: --val-fraction {config.val_fraction} leaves no validation rows")
    return train_rows, val_rows


def worker_pool(config: TrainWorkers) -> cluster.Pool:
    return cluster.Pool("Ray Train worker", config.num_workers, config.cpus_per_worker,
                        1.0 if config.use_gpu else 0.0, spare_cpus=cluster.DATA_CPU_RESERVE)


def check_resources(config: TrainWorkers, wait_seconds: float) -> None:
    """Refuse workers that no node can hold with their CPUs (and GPU), or that leave Ray Data no CPU for its
    decoding (`cluster.DATA_CPU_RESERVE`); a joined cluster gets `wait_seconds` for its nodes to appear first."""

    def attempt() -> None:
        nodes = cluster.live_nodes()
        cluster.check_pool(worker_pool(config), nodes, advice=worker_advice(config, nodes),
                           error=TrainResourcesError)

    cluster.within(wait_seconds, attempt)


def worker_advice(config: TrainWorkers, nodes: list[cluster.NodeResources]) -> str:
    """The CPUs per worker the cluster's CPUs would hold beside Ray Data's, as a suggestion."""
    spare = sum(cluster.node_cpus(nodes)) - cluster.DATA_CPU_RESERVE
    fitting = math.floor(spare / config.num_workers * 10) / 10
    smaller = f"--cpus-per-worker {fitting:g} or " if 0 < fitting < config.cpus_per_worker else ""
    return f"try {smaller}fewer workers{', or GPU nodes' if config.use_gpu else ''}, or add nodes"


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


def run_settings(arch: str, data_fingerprint: str, image_size: int, threshold_objective: str, recipe: dict, *,
                 signals: Sequence[str] = (), table_versions: dict[str, str] | None = None) -> dict:
    """What makes a checkpoint, as resume checks compare it: data, input size, recipe, and a fusion model's signals
    and the versions of its embedding tables. Both a run's settings and a checkpoint's meta are put this way."""
    return {"arch": arch, "data_fingerprint": data_fingerprint, "image_size": image_size,
            "threshold_objective": threshold_objective, "signals": list(signals),
            "embeddings": dict(table_versions or {}), **recipe}


def checkpoint_settings(meta: ModelMeta) -> dict:
    """What made a checkpoint (see `run_settings`)."""
    spec = meta.fusion_spec
    return run_settings(meta.arch, meta.data_fingerprint, meta.preprocess.image_size, meta.threshold_objective,
                        meta.recipe, signals=meta.signals, table_versions=spec.table_versions() if spec else {})


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


def check_before_start(config: TrainJob, settings: dict, fixed: Sequence[str], gpu_probe_timeout: float) -> None:
    """Before Ray Train starts: the run name resumes only with its checkpoints' `fixed` settings; the workers fit
    the cluster beside Ray Data; with GPUs, every GPU node can run the image's CUDA (probed within
    `gpu_probe_timeout` seconds), so that a bad node fails here, not in the first step."""
    check_settings_unchanged(config, settings, fixed)
    # A Ray this job started itself cannot grow; a joined cluster may still be adding nodes.
    check_resources(config, config.start_timeout if os.environ.get("RAY_ADDRESS") else 0)
    if config.use_gpu:
        check_gpu_workers(gpu_probe_timeout)


# --- the run ---------------------------------------------------------------------------------------------------------

class WholeValidationSplit(ray.train.DataConfig):
    """Training rows split equally, the `whole` datasets split whole. DDP steps every rank in lockstep, so each needs
    the same number of training batches (Ray's `equal=True` split drops up to world_size - 1 rows for that). The
    validation shards and cached-feature shards are gathered on every rank: dropping rows there would score each
    epoch, and tune the thresholds, on a different subset of the validation set."""

    def __init__(self, whole: Sequence[str]) -> None:
        super().__init__()
        self.whole = tuple(whole)

    def configure(self, datasets: dict[str, ray.data.Dataset], world_size: int, worker_handles: list | None,
                  worker_node_ids: list | None, **kwargs) -> list[dict[str, ray.data.DataIterator]]:
        equal = {name: ds for name, ds in datasets.items() if name not in self.whole}
        shards = super().configure(equal, world_size, worker_handles, worker_node_ids, **kwargs)
        for name in self.whole:
            if name in datasets:
                whole = datasets[name].copy(datasets[name])
                whole.context.execution_options = self.default_ingest_options()
                for shard, split in zip(shards, whole.streaming_split(world_size, equal=False), strict=True):
                    shard[name] = split
        return shards


def failure_config() -> ray.train.FailureConfig:
    """Worker failures restart the workers from the last checkpoint; a start that cannot place them fails."""
    return ray.train.FailureConfig(max_failures=MAX_WORKER_FAILURES, controller_failure_limit=MAX_START_FAILURES)


def build_torch_trainer(config: TrainJob, train_loop_per_worker: Callable[[dict], None], loop: object, *,
                        monitor: str, checkpoints_kept: int, datasets: dict[str, ray.data.Dataset],
                        whole: Sequence[str]) -> TorchTrainer:
    """The recipe's worker loop on `config.num_workers` workers (a GPU each with `use_gpu`), given `loop` (its
    settings) and the datasets; Ray Train keeps the `checkpoints_kept` best checkpoints by `monitor`."""
    fs, path = storage.arrow_filesystem(config.storage_path, config.storage_options)
    return TorchTrainer(
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
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=checkpoints_kept, checkpoint_score_attribute=monitor, checkpoint_score_order="max"),
        ),
        datasets=datasets,
        dataset_config=WholeValidationSplit(whole),
    )


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


def publish_best(result: ray.train.Result, config: TrainRun, monitor: str) -> TrainSummary:
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


def train_and_publish(trainer: TorchTrainer, config: TrainJob, monitor: str) -> TrainSummary:
    """Run the trainer (its starts bounded by `config.start_timeout`) and publish its best checkpoint."""
    return publish_best(fit_within(trainer, config, config.start_timeout), config, monitor)
