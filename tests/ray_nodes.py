"""Ray nodes started with `ray start` on 127.0.0.1, as on a cluster, in processes of their own.

A test that needs a Ray configured differently from conftest's `ray_local` starts nodes here and runs its jobs
as separate processes, the way users do: it never restarts Ray inside the test process (a driver's
background threads outlive `ray.shutdown()` there).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO

BIN = Path(sys.executable).parent
DEADLINE_SECONDS = 150


def node_env(**extra: str) -> dict[str, str]:
    """The environment of nodes, CLI calls and drivers. Token authentication stays on (Ray's default for
    `ray start`); clients need RAY_AUTH_MODE=token to present the token."""
    return {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}",
            "RAY_USAGE_STATS_ENABLED": "0", **extra}


def short_temp_dir() -> str:
    return tempfile.mkdtemp(prefix="gp", dir="/tmp")  # short: Ray's socket paths have a length limit


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


def pids_children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(child) for child in found.stdout.split()]


def descendants(pid: int) -> set[int]:
    found = {pid}
    for child in pids_children(pid):
        found |= descendants(child)
    return found


def kill_tree(pid: int) -> None:
    for process in descendants(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(process, signal.SIGKILL)


def stop_nodes(temp_dir: str) -> None:
    """Kill every process of the nodes started with --temp-dir=temp_dir (`ray stop` would stop every node of
    this machine, the tests' local Ray's too)."""
    for pid in pids_matching(temp_dir):
        kill_tree(pid)


@dataclass(frozen=True)
class HeadNode:
    address: str
    metrics_url: str  # the node's Prometheus endpoint
    session_dir: Path  # its logs

    def run_job(self, script: str, *args: str) -> subprocess.CompletedProcess:
        """`python jobs/<script>.py ARGS` on this node, in a process of its own as a user's shell runs it, with
        this process's environment as it is now (a test may have changed AWS_*)."""
        return subprocess.run([sys.executable, f"jobs/{script}.py", *args], env=node_env(RAY_ADDRESS=self.address),
                              cwd=REPO, capture_output=True, text=True, timeout=DEADLINE_SECONDS)

    def start_job(self, script: str, *args: str, **env: str) -> subprocess.Popen:
        """`run_job`, started and not waited for, with `env` added to the driver's environment."""
        return subprocess.Popen([sys.executable, f"jobs/{script}.py", *args],
                                env=node_env(RAY_ADDRESS=self.address, **env), cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def head_node(*extra_args: str) -> Iterator[HeadNode]:
    """A one-node Ray with 2 CPUs on ports of its own; its workers inherit this process's environment as it is
    when the node starts."""
    temp_dir = short_temp_dir()
    gcs, metrics, agent, client = (free_port() for _ in range(4))
    try:
        ray_cli("start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
                "--include-dashboard=false", f"--metrics-export-port={metrics}",
                f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
                f"--temp-dir={temp_dir}", *extra_args, env=node_env())
        yield HeadNode(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{metrics}/metrics",
                       (Path(temp_dir) / "session_latest").resolve())
    finally:
        stop_nodes(temp_dir)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)
