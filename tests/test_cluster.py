"""`ray job submit` to a real two-node Ray on 127.0.0.1 (head + a joined worker node, token auth on)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from conftest import REPO, save_random_model, write_sample_parts

BIN = Path(sys.executable).parent
MOVIES, PARTS = 600, 6
# Each node offers 3 logical CPUs; an actor takes 2, so the pool of 2 lands one actor per node and each node
# keeps a CPU for Ray Data's read and write tasks.
NODE_CPUS, ACTOR_CPUS = 3, 2
DEADLINE_SECONDS = 150


@dataclass
class Cluster:
    dashboard: str
    temp_dir: str
    worker_node_manager_port: int
    env: dict[str, str]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ray_cli(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / "ray"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=DEADLINE_SECONDS)
    assert not check or done.returncode == 0, f"ray {' '.join(args[:3])} failed:\n{done.stdout}\n{done.stderr}"
    return done


def pids_matching(pattern: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def kill_tree(pid: int) -> None:
    for child in pids_children(pid):
        kill_tree(child)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def pids_children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(child) for child in found.stdout.split()]


def wait_for_job_server(cluster: Cluster) -> None:
    """`ray start` returns before the dashboard's job server answers; poll it, within a deadline."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ray_cli("job", "list", "--address", cluster.dashboard, env=cluster.env, check=False).returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"the job server at {cluster.dashboard} never answered")


@pytest.fixture(scope="module")
def cluster():
    # Token authentication stays on (Ray's default for `ray start`); CLI clients need RAY_AUTH_MODE=token.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    temp_dir = tempfile.mkdtemp(prefix="gp", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dashboard, worker_nm = free_port(), free_port(), free_port()
    try:
        ray_cli("start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}", f"--num-cpus={NODE_CPUS}", f"--temp-dir={temp_dir}", env=env)
        ray_cli("start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", f"--num-cpus={NODE_CPUS}",
                f"--node-manager-port={worker_nm}", env=env)
        started = Cluster(f"http://127.0.0.1:{dashboard}", temp_dir, worker_nm, env)
        wait_for_job_server(started)
        yield started
    finally:
        for pid in pids_matching(temp_dir):
            kill_tree(pid)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cluster")
    return {"catalog": write_sample_parts(root, MOVIES, PARTS, seed=11),
            "model": save_random_model(root / "model", image_size=96), "root": str(root)}


def submit(cluster: Cluster, inputs: dict[str, str], output: str) -> str:
    job_id = f"genre-label-{uuid.uuid4().hex[:8]}"
    ray_cli(
        "job", "submit", "--address", cluster.dashboard, "--working-dir", ".", "--submission-id", job_id,
        "--no-wait", "--",
        "python", "jobs/label_catalog.py", "--catalog", inputs["catalog"], "--model", inputs["model"],
        "--output", output, "--run-date", "2026-11-21", "--batch-size", "16", "--actors", "2",
        "--cpus-per-actor", str(ACTOR_CPUS), env=cluster.env)
    return job_id


def job_status(cluster: Cluster, job_id: str) -> str:
    status = ray_cli("job", "status", "--address", cluster.dashboard, job_id, env=cluster.env)
    return status.stdout + status.stderr


def finished(status: str) -> bool:
    # `ray job status` prints "Job 'ID' succeeded" / "... failed" / "... was stopped", else "Status ...: RUNNING".
    return any(f"' {word}" in status for word in ("succeeded", "failed", "was stopped"))


def wait_for_job(cluster: Cluster, job_id: str) -> str:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while time.monotonic() < deadline:
        status = job_status(cluster, job_id)
        if finished(status):
            return status
        time.sleep(1)
    logs = ray_cli("job", "logs", "--address", cluster.dashboard, job_id, env=cluster.env, check=False)
    raise AssertionError(f"job {job_id} did not finish in {DEADLINE_SECONDS}s:\n{logs.stdout[-4000:]}")


def predictor_actors(cluster: Cluster) -> list[dict]:
    listed = ray_cli("list", "actors", "--address", cluster.dashboard, "--format", "json", "--detail",
                     "--limit", "10000", env=cluster.env)
    return [a for a in json.loads(listed.stdout) if "PosterLabeller" in a.get("class_name", "")]


def assert_one_row_per_movie(output: str) -> None:
    labels = pads.dataset(f"{output}/run_date=2026-11-21", format="parquet").to_table(columns=["movie_id"])
    assert labels.num_rows == MOVIES
    assert sorted(labels["movie_id"].to_pylist()) == list(range(1, MOVIES + 1))


@pytest.mark.slow
def test_submitted_job_uses_both_nodes(cluster, inputs):
    output = f"{inputs['root']}/labels-two-nodes"
    job_id = submit(cluster, inputs, output)
    status = wait_for_job(cluster, job_id)
    logs = ray_cli("job", "logs", "--address", cluster.dashboard, job_id, env=cluster.env).stdout
    assert f"Job '{job_id}' succeeded" in status, logs[-3000:]
    assert f"labelled {MOVIES} movies" in logs
    nodes = {actor["node_id"] for actor in predictor_actors(cluster)}
    assert len(nodes) == 2, predictor_actors(cluster)
    assert_one_row_per_movie(output)


@pytest.mark.slow
def test_losing_a_node_mid_run_still_labels_every_movie_once(cluster, inputs):
    output = f"{inputs['root']}/labels-node-lost"
    job_id = submit(cluster, inputs, output)
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not any(Path(output, "_staging").rglob("*.parquet")):  # half-way: the first files are written
        assert time.monotonic() < deadline and not finished(job_status(cluster, job_id)), "ended before half-way"
        time.sleep(0.1)
    raylets = pids_matching(f"node_manager_port={cluster.worker_node_manager_port}")
    assert raylets, "the worker node's raylet was not found"
    for pid in raylets:
        kill_tree(pid)
    status = wait_for_job(cluster, job_id)
    logs = ray_cli("job", "logs", "--address", cluster.dashboard, job_id, env=cluster.env).stdout
    assert f"Job '{job_id}' succeeded" in status, logs[-3000:]
    assert_one_row_per_movie(output)
