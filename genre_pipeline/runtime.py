"""What every job entry point shares: logging, Ray start-up, and `run_job`, which turns a bad input into exit 2."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import ray

from genre_pipeline.errors import EXIT_2_ERRORS
from genre_pipeline.telemetry import push_job_failure

# For the processes that run torch (label actors, training workers), read when the process starts: one malloc
# arena with high mmap/trim thresholds keeps a batch's freed activations for the next batch instead of faulting
# them in afresh, and passive OpenMP threads leave the cores to decoding between passes (docs/performance.md).
KEEP_FREED_BYTES = 1 << 30  # glibc's mmap and trim thresholds for torch processes
TORCH_WORKER_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(KEEP_FREED_BYTES),
                    "MALLOC_TRIM_THRESHOLD_": str(KEEP_FREED_BYTES), "OMP_WAIT_POLICY": "PASSIVE"}


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def init_ray() -> None:
    """Join the cluster under `ray job submit` (RAY_ADDRESS is set) or start a local Ray on a laptop.

    Object-store credentials are deliberately not forwarded in a `runtime_env`: Ray keeps runtime envs in its job
    table and shows and logs them (dashboard, raylet logs). A local Ray's workers inherit this process's
    environment, AWS_* included; on a cluster each node takes them from its own AWS chain (the pods' Secret, an
    instance or pod role). The endpoint, region and `--anonymous` travel with the jobs' StorageOptions.
    """
    if ray.is_initialized():
        return
    # Jobs log their own progress; Ray Data's per-operator progress bars would flood CI logs and job logs.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = bool(os.environ.get("GENRE_PIPELINE_PROGRESS"))
    # A bad input found in a task (a model an actor refuses) reaches the driver as itself, not as a message inside
    # a UserCodeException: run_job then exits 2 with it.
    context.raise_original_map_exception = True
    ray.init(log_to_driver=True)


@dataclass(frozen=True)
class FailureMetric:
    """Where a refused run is recorded: `genre_pipeline_<name>` (its Unix time) in the Pushgateway group
    {job, run}, beside what an earlier success of the same run pushed."""

    gateway: str | None  # HOST:PORT; None pushes nothing
    job: str
    run: str
    name: str


def refused_input(error: BaseException | None) -> BaseException | None:
    """The bad input behind `error`, also when Ray wrapped it on the way (an actor that refused the model it was
    given dies with its error inside a RayActorError); None for anything else."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, EXIT_2_ERRORS):
            return error
        seen.add(id(error))
        error = (getattr(error, "creation_task_error", None) or getattr(error, "cause", None)
                 or error.__cause__ or error.__context__)
    return None


def run_job(body: Callable[[], None], *, logger: logging.Logger, checks: Sequence[Callable[[], None]] = (),
            ray_needed: bool = False, failure: FailureMetric | None = None) -> int:
    """Run a job: its checks before Ray starts (a wrong setting, endpoint or bucket then costs seconds), Ray if
    the job needs it, then its body. 0 when the body returns; 2, logged and pushed as a failure, on a bad input
    or a refused run (`EXIT_2_ERRORS`). Anything else is a bug and keeps its traceback."""
    setup_logging()
    try:
        for check in checks:
            check()
        if ray_needed:
            init_ray()
        body()
    except Exception as error:
        refused = refused_input(error)
        if refused is None:
            raise
        logger.error("%s", refused)
        if failure is not None:
            push_job_failure(failure.gateway, job=failure.job, run=failure.run, name=failure.name,
                             timestamp=time.time())
        return 2
    return 0
