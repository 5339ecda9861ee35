"""What every job entry point shares: logging, Ray start-up, and `run_job`, which turns a bad input into exit 2."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
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
# Ray returns an object under its max_direct_call_object_size (100 KB) inline to the owner, the driver, where Ray
# Data's small blocks (64 label rows: ~10 KB) then wait for their consumer: the driver grew with the catalogue
# (docs/performance.md). From this size on the jobs' workers put them in the object store; a block's metadata
# (~1.5 KB) still comes inline.
INLINE_RETURN_MAX_BYTES = 4096
JOB_WORKER_ENV = {"RAY_max_direct_call_object_size": str(INLINE_RETURN_MAX_BYTES)}


# Ray's own loggers print from this level on; below it their records stay in the Ray session's log files
# (Ray Data keeps everything, DEBUG included, in <session>/logs/ray-data/ray-data.log).
RAY_CONSOLE_LEVEL = logging.WARNING
RAY_CONSOLE_LOGGERS = ("ray", "ray.data", "ray.train")
# Ray Data warnings about what this project does on purpose: off the console, still in ray-data.log. Progress bars
# are off unless asked for (below); a small night's labels table has fewer files than Ray Data's default parallelism.
EXPECTED_RAY_WARNINGS = ("Progress bars disabled", "Reducing the parallelism to")


class DropExpected(logging.Filter):
    """Drops the records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file=None,
                line: str | None = None) -> None:
    """`warnings.showwarning` as one log line (Python prints the warning's source line under it)."""
    logging.getLogger("py.warnings").warning("%s:%d: %s: %s", filename, lineno, category.__name__, message)


def setup_logging(verbose: bool = False) -> None:
    """Our INFO lines on stderr; Ray's own console output from WARNING on (`quiet_ray_console`). Python warnings
    become log lines, one line each."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warnings.showwarning = log_warning
    # A hint to Ray Data's own callers (a filter given a function rather than an expression), not to a job's user.
    warnings.filterwarnings("ignore", message="Use 'expr' instead of 'fn'", module="ray.data")
    quiet_ray_console()


def quiet_ray_console() -> None:
    """Ray's console handlers at `RAY_CONSOLE_LEVEL` (a local Ray's start, each dataset's plan, timing and
    progress are INFO), and without `EXPECTED_RAY_WARNINGS`; the loggers' levels and file handlers stay as Ray set
    them, so the session's log files keep everything."""
    for name in RAY_CONSOLE_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(max(handler.level, RAY_CONSOLE_LEVEL))
                if not any(isinstance(f, DropExpected) for f in handler.filters):
                    handler.addFilter(DropExpected(EXPECTED_RAY_WARNINGS))


def progress_bars_wanted() -> bool:
    """Ray Data's progress bars: on a terminal, or when GENRE_PIPELINE_PROGRESS is set; never in CI or job logs,
    which they would flood (per operator, redrawn)."""
    return bool(os.environ.get("GENRE_PIPELINE_PROGRESS")) or sys.stdout.isatty()


def job_runtime_env() -> dict | None:
    """The jobs' runtime_env: JOB_WORKER_ENV for every worker, less the variables this process already has (a
    local Ray's workers inherit them; `ray job submit --runtime-env-json` sets its env_vars here too, and Ray
    refuses a variable set twice)."""
    env_vars = {name: value for name, value in JOB_WORKER_ENV.items() if name not in os.environ}
    return {"env_vars": env_vars} if env_vars else None


def init_ray() -> None:
    """Join the cluster under `ray job submit` (RAY_ADDRESS is set) or start a local Ray on a laptop.

    Object-store credentials are deliberately not forwarded in a `runtime_env`: Ray keeps runtime envs in its job
    table and shows and logs them (dashboard, raylet logs). A local Ray's workers inherit this process's
    environment, AWS_* included; on a cluster each node takes them from its own AWS chain (the pods' Secret, an
    instance or pod role). The endpoint, region and `--anonymous` travel with the jobs' StorageOptions.
    """
    if ray.is_initialized():
        return
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress_bars_wanted()
    # A bad input found in a task (a model an actor refuses) reaches the driver as itself, not as a message inside
    # a UserCodeException: run_job then exits 2 with it.
    context.raise_original_map_exception = True
    # Workers' output reaches this process's console unless RAY_LOG_TO_DRIVER=0 (Ray's own setting, which the
    # demo sets): it then stays in the workers' log files under the session's logs/ folder.
    ray.init(runtime_env=job_runtime_env())
    quiet_ray_console()  # ray.init configures Ray's logger on its first call


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
