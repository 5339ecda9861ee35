"""What every job shares at start-up: a local Ray when no cluster is given, Ray Data's progress bars off unless asked
for (or on a terminal), Ray's own console output from WARNING on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A fresh process: init_ray starts a local Ray only where none runs (the tests' own Ray would hide it).
PROBE = """
import os, ray
from genre_pipeline.runtime import init_ray
for asked in ("", "1"):
    os.environ["GENRE_PIPELINE_PROGRESS"] = asked
    init_ray()
    print("bars", asked or "-", ray.data.DataContext.get_current().enable_progress_bars, ray.is_initialized())
    ray.shutdown()
"""


def test_a_local_ray_without_progress_bars_unless_asked():
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**env, "RAY_DISABLE_USAGE_STATS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("bars ")]
    assert lines == ["bars - False True", "bars 1 True True"], result.stdout


# A fresh process: the console handlers Ray and Ray Data set up on import, then ours on top.
CONSOLE_PROBE = """
import logging
import ray.data
from genre_pipeline.runtime import setup_logging
setup_logging()
handler = next(h for h in logging.getLogger("ray.data").handlers if type(h).__name__ == "PlainRayHandler")
files = [h for h in logging.getLogger("ray.data").handlers if type(h).__name__ == "SessionFileHandler"]
record = logging.LogRecord("ray.data.x", logging.WARNING, "", 1, "Reducing the parallelism to 1, as ...", (), None)
print("console", logging.getLevelName(handler.level), handler.filter(record), len(files))
print("level", logging.getLevelName(logging.getLogger("ray.data").level))
"""


def test_ray_prints_warnings_and_keeps_the_rest_in_its_log_files():
    result = subprocess.run([sys.executable, "-c", CONSOLE_PROBE], capture_output=True, text=True, timeout=300,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    # The console shows WARNING and up, less the warnings about what the jobs do on purpose; the logger itself
    # still passes DEBUG to Ray Data's file handler.
    assert result.stdout.splitlines() == ["console WARNING False 1", "level DEBUG"], result.stdout


# A fresh process: the jobs' own local Ray, a 1 KB and a 10 KB task return, where each one lies; then the same
# with the variable already in the environment (as `ray job submit --runtime-env-json` would set it).
STORE_PROBE = """
import ray
from genre_pipeline.runtime import init_ray, job_runtime_env
print("env", job_runtime_env())
init_ray()

@ray.remote
def payload(size):
    return b"x" * size

import time
refs = [payload.remote(1000), payload.remote(10_000)]
ray.get(refs)
# A stored object's node reaches its owner asynchronously (under load, after ray.get returns); an inline object
# never gets one. Bounded: the 10 KB object's node is waited for until a deadline, then both are read.
deadline = time.monotonic() + 20
while not ray.experimental.get_object_locations(refs[1:])[refs[1]]["node_ids"] and time.monotonic() < deadline:
    time.sleep(0.2)
locations = ray.experimental.get_object_locations(refs)
print("in store", [bool(locations[ref]["node_ids"]) for ref in refs])
ray.shutdown()
"""


def run_store_probe(**extra_env: str) -> list[str]:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-c", STORE_PROBE], capture_output=True, text=True, timeout=300,
                            cwd=REPO, env={**env, "RAY_DISABLE_USAGE_STATS": "1", **extra_env})
    assert result.returncode == 0, result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if line.startswith(("env ", "in store "))]


def test_the_jobs_workers_put_blocks_in_the_object_store_not_inline_in_the_driver():
    # Ray's default would return both inline to the driver (under 100 KB).
    assert run_store_probe() == ["env {'env_vars': {'RAY_max_direct_call_object_size': '4096'}}",
                                 "in store [False, True]"]


def test_a_size_the_job_was_given_is_kept():
    assert run_store_probe(RAY_max_direct_call_object_size="20000") == ["env None", "in store [False, False]"]
