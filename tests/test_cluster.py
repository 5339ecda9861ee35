"""`ray job submit` to a real two-node Ray on 127.0.0.1 (head + a joined worker node, token auth on)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from conftest import save_random_model, write_sample_parts
from ray_nodes import (
    DEADLINE_SECONDS,
    descendants,
    free_port,
    kill_tree,
    node_env,
    pids_matching,
    ray_cli,
    short_temp_dir,
    stop_nodes,
    wait_until,
)

MOVIES, PARTS = 600, 6
# Each node offers 3 logical CPUs; an actor takes 2, so the pool of 2 lands one actor per node and each node
# keeps a CPU for Ray Data's read and write tasks.
NODE_CPUS, ACTOR_CPUS = 3, 2


@dataclass
class Cluster:
    dashboard: str
    temp_dir: str
    worker_node_manager_port: int
    env: dict[str, str]


def wait_for_job_server(cluster: Cluster) -> None:
    """`ray start` returns before the dashboard's job server answers; poll it, within a deadline."""
    wait_until(lambda: ray_cli("job", "list", "--address", cluster.dashboard, env=cluster.env,
                               check=False).returncode == 0, f"the job server at {cluster.dashboard} answers")


@pytest.fixture(scope="module")
def cluster():
    env, temp_dir = node_env(), short_temp_dir()
    gcs, dashboard, worker_nm = free_port(), free_port(), free_port()
    # Each node's dashboard agent (which takes job submissions) gets its own port: the default one may be held
    # by the other node or by the tests' local Ray.
    head_agent, worker_agent = free_port(), free_port()
    try:
        ray_cli("start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={head_agent}",
                f"--num-cpus={NODE_CPUS}", f"--temp-dir={temp_dir}", env=env)
        ray_cli("start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", f"--num-cpus={NODE_CPUS}",
                f"--node-manager-port={worker_nm}", f"--dashboard-agent-listen-port={worker_agent}", env=env)
        started = Cluster(f"http://127.0.0.1:{dashboard}", temp_dir, worker_nm, env)
        wait_for_job_server(started)
        yield started
    finally:
        stop_nodes(temp_dir)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cluster")
    return {"catalog": write_sample_parts(root, MOVIES, PARTS, seed=11),
            "model": save_random_model(root / "model", image_size=96), "root": str(root)}


def submit(cluster: Cluster, inputs: dict[str, str], output: str) -> str:
    job_id = f"genre-label-{uuid.uuid4().hex[:8]}"
    args = ("job", "submit", "--address", cluster.dashboard, "--working-dir", ".", "--submission-id", job_id,
            "--no-wait", "--",
            "python", "jobs/label_catalog.py", "--catalog", inputs["catalog"], "--model", inputs["model"],
            "--output", output, "--run-date", "2026-11-21", "--batch-size", "16", "--actors", "2",
            "--cpus-per-actor", str(ACTOR_CPUS))
    ray_cli(*args, env=cluster.env)
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


def pids_reading(path: Path) -> set[int]:
    readers = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            if os.readlink(fd) == str(path):
                readers.add(int(fd.parts[2]))
    return readers


class PosterGates:
    """Posters served through named pipes. A job's read of one blocks until the test serves it, so the test
    sees which process reads which poster and holds the job there while it breaks the cluster. Every reader,
    a retried one too, gets the poster's bytes."""

    def __init__(self, posters: list[Path]) -> None:
        self.data = {poster: poster.read_bytes() for poster in posters}
        for poster in posters:
            poster.unlink()
            os.mkfifo(poster)
        self.held: list[tuple[Path, int]] = []  # (poster, write end) of readers waiting to be served
        self.stopped = threading.Event()

    def admit_readers(self) -> None:
        """Hold every process that has started to read a gated poster (its open completes, its read waits)."""
        for poster in self.data:
            with contextlib.suppress(OSError):  # ENXIO: nobody reads it now
                fd = os.open(poster, os.O_WRONLY | os.O_NONBLOCK)
                os.set_blocking(fd, True)
                self.held.append((poster, fd))

    def held_readers(self) -> set[int]:
        return set().union(*(pids_reading(poster) for poster, _ in self.held))

    def serve_held(self) -> None:
        for poster, fd in self.held:
            with contextlib.suppress(BrokenPipeError):  # that reader died with its node; its retry reads again
                os.write(fd, self.data[poster])  # a few KB: fits the pipe's buffer
            os.close(fd)
        self.held = []

    def serve_forever(self) -> None:
        while not self.stopped.wait(0.05):
            self.admit_readers()
            self.serve_held()

    def restore(self) -> None:
        self.stopped.set()
        for poster, data in self.data.items():
            poster.unlink()
            poster.write_bytes(data)


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
    """The worker node dies while its labelling actor is reading a poster: the actor and its in-flight blocks
    are lost, and the job must still commit every movie exactly once."""
    output = f"{inputs['root']}/labels-node-lost"
    uris = pads.dataset(inputs["catalog"], format="parquet").to_table(columns=["poster_uri"])["poster_uri"]
    # Every 32nd poster is gated, so every 64-row block waits on one: no actor gets past its first block
    # until the test lets it.
    gates = PosterGates([Path(uri) for uri in uris.drop_null().to_pylist()[::32]])
    raylets = pids_matching(f"node_manager_port={cluster.worker_node_manager_port}")
    assert raylets, "the worker node's raylet was not found"
    serving = threading.Thread(target=gates.serve_forever, daemon=True)
    try:
        job_id = submit(cluster, inputs, output)

        def worker_node_reads() -> bool:
            gates.admit_readers()
            return bool(gates.held_readers() & set().union(*(descendants(pid) for pid in raylets)))

        wait_until(worker_node_reads, "the worker node's labelling actor reads a gated poster")
        assert not finished(job_status(cluster, job_id)), "the job ended while posters were held"
        for pid in raylets:
            kill_tree(pid)
        gates.serve_held()
        serving.start()
        status = wait_for_job(cluster, job_id)
    finally:
        gates.restore()
    logs = ray_cli("job", "logs", "--address", cluster.dashboard, job_id, env=cluster.env).stdout
    assert f"Job '{job_id}' succeeded" in status, logs[-3000:]
    assert_one_row_per_movie(output)
    labels = pads.dataset(f"{output}/run_date=2026-11-21", format="parquet").to_table().to_pylist()
    assert {row["status"] for row in labels if Path(row["poster_uri"] or "") in gates.data} == {"ok"}
