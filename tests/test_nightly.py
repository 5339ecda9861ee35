"""Nightly re-runs through the real entry point: a driver killed mid-run (its posters half scored) leaves the
committed night whole where the documented queries read, and the next run for that night replaces it and clears
the abandoned spool."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, save_random_model, write_sample_parts

from genre_pipeline.failpoints import DIR_ENV_VAR, ENV_VAR
from genre_pipeline.label.warehouse import run_query

NIGHT = "2026-11-20"
MOVIES = 400
PARTS = 4
JOB_TIMEOUT_SECONDS = 300


@pytest.fixture(scope="module")
def night_inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("nightly")
    return {"catalog": write_sample_parts(root, MOVIES, PARTS, seed=5),
            "model": save_random_model(root / "model", image_size=32), "output": str(root / "labels")}


def start_job(inputs: dict[str, str], failpoints: str = "", pause_dir: Path | None = None) -> subprocess.Popen:
    command = [sys.executable, "jobs/label_catalog.py", "--catalog", inputs["catalog"], "--model", inputs["model"],
               "--output", inputs["output"], "--run-date", NIGHT, "--batch-size", "16"]
    env = {**os.environ, ENV_VAR: failpoints, DIR_ENV_VAR: str(pause_dir or "")}
    # Its own session, so the local Ray the driver starts can be cleaned up with the whole group afterwards.
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(process: subprocess.Popen) -> str:
    try:
        output, _ = process.communicate(timeout=JOB_TIMEOUT_SECONDS)
    finally:
        kill_group(process)
    assert process.returncode == 0, output[-3000:]
    return output


def kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_SECONDS
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            output_text = process.stdout.read() if process.poll() is not None else "(still running)"
            raise AssertionError(f"{path.name} never appeared (exit {process.returncode}):\n{output_text[-3000:]}")
        time.sleep(0.05)


def night_rows(output: str) -> list[dict]:
    sql = f"SELECT run_id, count(*) AS rows, count(DISTINCT movie_id) AS movies FROM labels " \
          f"WHERE run_date = DATE '{NIGHT}' GROUP BY run_id"
    return run_query(output, sql).to_pylist()


def committed_run_id(output: str) -> str:
    rows = night_rows(output)
    assert len(rows) == 1 and rows[0]["rows"] == rows[0]["movies"] == MOVIES, rows
    return rows[0]["run_id"]


def spools(output: Path) -> list[Path]:
    return sorted((output.parent / f".{output.name}.staging").glob(f"{NIGHT}-*.parquet"))


@pytest.mark.slow
def test_killed_run_leaves_the_night_whole_and_the_next_run_completes_it(night_inputs, tmp_path):
    output = Path(night_inputs["output"])
    finish(start_job(night_inputs))
    first = committed_run_id(str(output))

    # The driver dies while an actor is scoring a block: its spool is open, nothing is committed.
    killed = start_job(night_inputs, failpoints="labeller.score=pause", pause_dir=tmp_path)
    try:
        wait_for(tmp_path / "labeller.score.reached", killed)
        assert len(spools(output)) == 1
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
    finally:
        kill_group(killed)
    assert len(spools(output)) == 1, "the kill leaves its spool behind"
    assert committed_run_id(str(output)) == first  # readers still see the whole previous run, and only it

    finish(start_job(night_inputs))
    rerun = committed_run_id(str(output))
    assert rerun != first
    assert spools(output) == []
