"""`ray job submit` to a real two-node Ray on 127.0.0.1 (head + a joined worker node, token auth on)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

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

from genre_pipeline.failpoints import DIR_ENV_VAR, ENV_VAR

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


def submit(cluster: Cluster, inputs: dict[str, str], output: str, failpoints: dict[str, str] | None = None) -> str:
    job_id = f"genre-label-{uuid.uuid4().hex[:8]}"
    runtime_env = json.dumps({"env_vars": failpoints or {}})
    args = ("job", "submit", "--address", cluster.dashboard, "--working-dir", ".", "--submission-id", job_id,
            "--runtime-env-json", runtime_env, "--no-wait", "--",
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
def test_losing_a_node_mid_run_still_labels_every_movie_once(cluster, inputs, tmp_path):
    """The worker node dies while its labelling actor is scoring a block: the actor and its in-flight blocks
    are lost, and the job must still commit every movie exactly once. The actors pause at the
    `labeller.score` failpoint, so the test knows the worker node's actor holds a block when it kills it."""
    output = f"{inputs['root']}/labels-node-lost"
    raylets = pids_matching(f"node_manager_port={cluster.worker_node_manager_port}")
    assert raylets, "the worker node's raylet was not found"
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    job_id = submit(cluster, inputs, output, failpoints={ENV_VAR: "labeller.score=pause", DIR_ENV_VAR: str(pauses)})

    def worker_node_scores() -> bool:
        reached = pauses / "labeller.score.reached"
        paused = {int(pid) for pid in reached.read_text().split()} if reached.exists() else set()
        return bool(paused & set().union(*(descendants(pid) for pid in raylets)))

    wait_until(worker_node_scores, "the worker node's labelling actor holds a block")
    assert not finished(job_status(cluster, job_id)), "the job ended while its actors were paused"
    for pid in raylets:
        kill_tree(pid)
    (pauses / "labeller.score.release").touch()
    status = wait_for_job(cluster, job_id)
    logs = ray_cli("job", "logs", "--address", cluster.dashboard, job_id, env=cluster.env).stdout
    assert f"Job '{job_id}' succeeded" in status, logs[-3000:]
    assert_one_row_per_movie(output)
    labels = pads.dataset(f"{output}/run_date=2026-11-21", format="parquet").to_table().to_pylist()
    assert {row["status"] for row in labels if row["poster_uri"]} == {"ok"}
