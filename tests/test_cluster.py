"""Whether a job's actors and workers fit the cluster, and that no job waits for them forever; then `ray job
submit` to a real two-node Ray on 127.0.0.1 (head + a joined worker node, token auth on).

Feasibility runs on node lists, on the tests' local Ray (no GPU) and on a Ray node of its own that declares one
logical GPU (`ray start --num-gpus=1`: Ray schedules against it, no CUDA needed). A pool that fits but cannot
start (another job holds its resources) must fail within the job's --start-timeout.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import ray
from conftest import REPO, labels_table, read_night, save_random_model, write_sample_parts
from ray_nodes import (
    DEADLINE_SECONDS,
    HeadNode,
    descendants,
    free_port,
    head_node,
    kill_tree,
    node_env,
    pids_matching,
    ray_cli,
    short_temp_dir,
    stop_nodes,
    wait_until,
)

from genre_pipeline import cluster as placement
from genre_pipeline.cluster import ActorResources, ClusterResourcesError, NodeResources, Pool, shortfall
from genre_pipeline.failpoints import DIR_ENV_VAR, ENV_VAR
from genre_pipeline.label.pipeline import (
    ActorResourcesError,
    LabelConfig,
    actors_started_in_time,
    resolve_actor_resources,
)
from genre_pipeline.train.driver import (
    TrainJobConfig,
    TrainResourcesError,
    build_trainer,
    check_resources,
    fit_within,
)

# --- feasibility on given nodes --------------------------------------------------------------------------------

GPU_NODE = NodeResources(cpus=8, gpus=2)


def test_a_gpu_pool_on_a_cluster_without_gpus_names_the_pool_and_the_gpus():
    pool = Pool("label actor", 4, cpus=1, gpus=1, spare_cpus=1)
    assert shortfall(pool, [NodeResources(cpus=16)]) == "4 label actors of 1 GPU and 1 CPU each: the cluster has 0 GPUs"
    assert shortfall(pool, [GPU_NODE]) == "4 label actors of 1 GPU and 1 CPU each: the cluster has 2 GPUs"
    assert shortfall(pool, [GPU_NODE, GPU_NODE]) is None


def test_each_process_must_fit_on_one_node_with_its_cpus_and_gpu():
    # 3 GPUs and 9 CPUs in all, but the GPU nodes have 1 CPU each: no 2-CPU worker can sit beside its GPU
    nodes = [NodeResources(cpus=1, gpus=1), NodeResources(cpus=1, gpus=2), NodeResources(cpus=7)]
    worker = Pool("Ray Train worker", 2, cpus=2, gpus=1)
    assert shortfall(worker, nodes) == ("2 Ray Train workers of 1 GPU and 2 CPUs each: only 0 fit on the live "
                                        "nodes (1 CPU + 1 GPU; 1 CPU + 2 GPUs; 7 CPUs)")
    assert shortfall(dataclasses.replace(worker, cpus=1), nodes) is None
    # fractional GPUs share a card: 4 actors of half a GPU on 2 GPUs, not 5
    assert shortfall(Pool("label actor", 4, cpus=1, gpus=0.5), [GPU_NODE]) is None
    assert "the cluster has 2 GPUs" in shortfall(Pool("label actor", 5, cpus=1, gpus=0.5), [GPU_NODE])


def test_the_spare_cpu_must_be_whole_on_one_node():
    # two 2-CPU nodes: two 1.5-CPU workers leave 0.5 CPU on each, 1 in all, but Ray Data's task needs 1 whole
    nodes = [NodeResources(cpus=2), NodeResources(cpus=2)]
    assert shortfall(Pool("Ray Train worker", 2, cpus=1.5, spare_cpus=1), nodes) == (
        "2 Ray Train workers of 1.5 CPUs each beside the 1 CPU Ray Data's tasks need: no node of the live nodes "
        "(2 CPUs; 2 CPUs) keeps those free once they are placed")
    assert shortfall(Pool("Ray Train worker", 3, cpus=1, spare_cpus=1), nodes) is None
    assert shortfall(Pool("Ray Train worker", 4, cpus=1, spare_cpus=1), nodes) == (
        "4 Ray Train workers of 1 CPU each beside the 1 CPU Ray Data's tasks need (5 CPUs in all): the cluster "
        "has 4 CPUs")


def test_waiting_for_nodes_ends_when_they_come_or_at_the_deadline(monkeypatch):
    monkeypatch.setattr(placement, "POLL_SECONDS", 0.01)
    nodes = iter([[], [], [GPU_NODE]])  # a GPU node joins at the third look
    pool = Pool("label actor", 2, cpus=1, gpus=1)

    def attempt() -> int:
        placement.check_pool(pool, next(nodes))
        return 2

    assert placement.within(60, attempt) == 2
    started = time.monotonic()
    with pytest.raises(ClusterResourcesError, match="2 label actors of 1 GPU and 1 CPU each: the cluster has 0 GPUs"):
        placement.within(0.05, lambda: placement.check_pool(pool, []))
    assert time.monotonic() - started < 5


def test_training_workers_are_placed_node_by_node(monkeypatch):
    """Enough CPUs and GPUs in all, but no node holds a worker: the old sums passed this."""
    monkeypatch.setattr(ray, "nodes", lambda: [
        {"Alive": True, "Resources": {"CPU": 1.0, "GPU": 1.0}},
        {"Alive": True, "Resources": {"CPU": 8.0}},
        {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}},  # a dead node offers nothing
    ])
    config = TrainJobConfig(catalog="c", storage_path="s", name="n", num_workers=1, cpus_per_worker=2, use_gpu=True)
    with pytest.raises(TrainResourcesError, match=r"1 Ray Train worker of 1 GPU and 2 CPUs: only 0 fit on the "
                                                  r"live nodes \(1 CPU \+ 1 GPU; 8 CPUs\)"):
        check_resources(config, 0)
    check_resources(dataclasses.replace(config, cpus_per_worker=1), 0)


def test_a_pool_timeout_becomes_the_label_jobs_error():
    config = LabelConfig(catalog="c", model="m", output="o", run_date="2026-01-01", num_gpus_per_actor=1,
                         start_timeout=30)
    with pytest.raises(ActorResourcesError, match=r"^4 label actors of 1 GPU and 1 CPU each did not start within "
                                                  r"--start-timeout 30 s"), actors_started_in_time(
            config, ActorResources(actors=4, cpus=1, threads=1)):
        raise ray.exceptions.GetTimeoutError("Timed out while starting actors. This may mean ...")
    with pytest.raises(ray.exceptions.GetTimeoutError, match="another wait"), actors_started_in_time(
            config, ActorResources(actors=4, cpus=1, threads=1)):
        raise ray.exceptions.GetTimeoutError("another wait")


# --- on the tests' local Ray: 2 CPUs, no GPU ---------------------------------------------------------------------


def test_gpu_actors_on_a_ray_without_gpus_are_refused_before_any_work(ray_local):
    config = LabelConfig(catalog="c", model="m", output="o", run_date="2026-01-01", num_gpus_per_actor=1)
    with pytest.raises(ActorResourcesError, match=r"^4 label actors of 1 GPU and 1 CPU each: the cluster has "
                                                  r"0 GPUs: the job would wait forever"):
        resolve_actor_resources(dataclasses.replace(config, actors=4))
    with pytest.raises(ActorResourcesError, match=r"^1 label actor of 1 GPU and 1 CPU: the cluster has 0 GPUs"):
        resolve_actor_resources(config)  # the default pool: the cluster's GPUs, at least one actor
    training = TrainJobConfig(catalog="c", storage_path="s", name="n", num_workers=2, use_gpu=True)
    with pytest.raises(TrainResourcesError, match=r"^2 Ray Train workers of 1 GPU and 1 CPU each: the cluster "
                                                  r"has 0 GPUs"):
        check_resources(training, 0)


def test_training_workers_that_leave_ray_data_no_cpu_get_a_size_that_fits(ray_local):
    config = TrainJobConfig(catalog="c", storage_path="s", name="n", num_workers=2, cpus_per_worker=1)
    with pytest.raises(TrainResourcesError) as refused:
        check_resources(config, 0)
    assert str(refused.value) == (
        "2 Ray Train workers of 1 CPU each beside the 1 CPU Ray Data's tasks need (3 CPUs in all): the cluster has "
        "2 CPUs: the job would wait forever; try --cpus-per-worker 0.5 or fewer workers, or add nodes")
    check_resources(dataclasses.replace(config, cpus_per_worker=0.5), 0)


@ray.remote(num_cpus=2)
class CpuHolder:
    """Another job's actor that holds the local Ray's 2 CPUs."""

    def ready(self) -> bool:
        return True


def test_training_workers_that_cannot_be_placed_fail_within_the_start_timeout(ray_local, tmp_path):
    catalog = write_sample_parts(tmp_path, 40, 1, seed=5)
    config = TrainJobConfig(catalog=catalog, storage_path=str(tmp_path / "runs"), name="held", arch="cnn",
                            epochs=1, num_workers=1, cpus_per_worker=1, image_size=32, val_fraction=0.25,
                            start_timeout=2)
    trainer, _ = build_trainer(config)  # the workers fit the cluster: the check lets them through
    holder = CpuHolder.remote()
    try:
        assert ray.get(holder.ready.remote(), timeout=DEADLINE_SECONDS)
        with pytest.raises(TrainResourcesError, match=r"^1 Ray Train worker of 1 CPU could not be placed within "
                                                      r"--start-timeout 2 s \(2 tries\)"):
            fit_within(trainer, config, config.start_timeout)  # as run_training does; another job holds the CPUs
    finally:
        ray.kill(holder)
    wait_until(lambda: ray.available_resources().get("CPU", 0) == 2, "the held CPUs are free again")


# --- on a Ray node of its own with one logical GPU -------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_node() -> Iterator[HeadNode]:
    with head_node("--num-gpus=1") as node:
        yield node


def on_node(node: HeadNode, code: str) -> str:
    """Run `code` in a driver of its own on the node; its stdout."""
    done = subprocess.run([sys.executable, "-c", code], env=node_env(RAY_ADDRESS=node.address), cwd=REPO,
                          capture_output=True, text=True, timeout=DEADLINE_SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


RESOLVE_ON_NODE = """
import dataclasses, json, ray
from genre_pipeline.label.pipeline import ActorResourcesError, LabelConfig, resolve_actor_resources
ray.init(log_to_driver=False)
config = LabelConfig(catalog="c", model="m", output="o", run_date="2026-01-01", num_gpus_per_actor=1,
                     start_timeout=1)
def outcome(**changes):
    try:
        return dataclasses.asdict(resolve_actor_resources(dataclasses.replace(config, **changes)))
    except ActorResourcesError as error:
        return str(error)
print(json.dumps({"default": outcome(), "one": outcome(actors=1), "two": outcome(actors=2),
                  "two halves": outcome(actors=2, num_gpus_per_actor=0.5, cpus_per_actor=0.5),
                  "cpus": outcome(cpus_per_actor=2)}))
"""


@pytest.mark.slow
def test_a_gpu_pool_that_fits_is_sized_and_one_that_does_not_is_refused(gpu_node):
    found = json.loads(on_node(gpu_node, RESOLVE_ON_NODE).strip().splitlines()[-1])
    assert found["default"] == found["one"] == {"actors": 1, "cpus": 1.0, "threads": 1}
    assert found["two halves"] == {"actors": 2, "cpus": 0.5, "threads": 1}  # half a GPU and a CPU each
    assert found["two"].startswith("2 label actors of 1 GPU and 1 CPU each: the cluster has 1 GPU:"), found
    # the node's 2 CPUs: the actor's 2 leave none for Ray Data's tasks
    assert found["cpus"].startswith("1 label actor of 1 GPU and 2 CPUs beside the 1 CPU Ray Data's tasks need "
                                    "(3 CPUs in all): the cluster has 2 CPUs"), found


@pytest.fixture(scope="module")
def label_inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gpu-pool")
    return {"catalog": write_sample_parts(root, 8, 1, seed=3), "model": save_random_model(root / "model"),
            "output": str(root / "labels")}


def label_on_gpus(node: HeadNode, inputs: dict[str, str], *flags: str) -> subprocess.CompletedProcess:
    return node.run_job("label_catalog", "--catalog", inputs["catalog"], "--model", inputs["model"],
                        "--output", inputs["output"], "--run-date", "2026-01-01", "--num-gpus-per-actor", "1",
                        *flags)


@pytest.mark.slow
def test_the_label_job_refuses_a_gpu_pool_the_cluster_cannot_hold_with_exit_2(gpu_node, label_inputs):
    # a joined cluster: the job waits --start-timeout for nodes to join, then gives up
    done = label_on_gpus(gpu_node, label_inputs, "--actors", "2", "--start-timeout", "3")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "2 label actors of 1 GPU and 1 CPU each: the cluster has 1 GPU" in done.stderr, done.stderr[-3000:]


@pytest.fixture(scope="module")
def four_cpu_node() -> Iterator[HeadNode]:
    with head_node("--num-cpus=4") as node:  # the last --num-cpus counts
        yield node


HOLD_TWO_CPUS = """
import ray
ray.init(namespace="held", log_to_driver=False)
@ray.remote(num_cpus=2)
class Holder:
    def ready(self):
        return True
holder = Holder.options(name="cpu-holder", lifetime="detached").remote()
print(ray.get(holder.ready.remote()))
"""
RELEASE_TWO_CPUS = "import ray; ray.init(namespace='held', log_to_driver=False); ray.kill(ray.get_actor('cpu-holder'))"


@pytest.mark.slow
def test_a_label_pool_held_by_another_job_fails_within_the_start_timeout(four_cpu_node, label_inputs):
    """The pool fits the cluster (one actor of the node's 4 CPUs less Ray Data's 1), but another job holds 2 of
    them: Ray Data would wait for the actor forever. Its own tasks still have the CPU they need."""
    assert on_node(four_cpu_node, HOLD_TWO_CPUS).strip().endswith("True")
    try:
        done = four_cpu_node.run_job("label_catalog", "--catalog", label_inputs["catalog"], "--model",
                                     label_inputs["model"], "--output", label_inputs["output"], "--run-date",
                                     "2026-01-01", "--start-timeout", "5")
    finally:
        on_node(four_cpu_node, RELEASE_TWO_CPUS)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "1 label actor of 3 CPUs did not start within --start-timeout 5 s" in done.stderr, done.stderr[-3000:]
    assert labels_table(label_inputs["output"]).current_snapshot() is None  # nothing committed


# --- ray job submit to two nodes ---------------------------------------------------------------------------------

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
    return [a for a in json.loads(listed.stdout) if "Labeller" in a.get("class_name", "")]


def assert_one_row_per_movie(output: str) -> None:
    labels = read_night(output, "2026-11-21").select(["movie_id"])
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
    labels = read_night(output, "2026-11-21").to_pylist()
    assert {row["status"] for row in labels if row["poster_uri"]} == {"ok"}
