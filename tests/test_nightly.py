"""Nightly re-runs through the real entry point: a driver killed half-way leaves nothing partial where the
documented queries read, and the next run for that night completes it."""

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

from genre_pipeline.warehouse import run_query

NIGHT = "2026-11-20"
MOVIES = 1200  # long enough that the kill lands after the first staged file and well before the commit
PARTS = 12
JOB_TIMEOUT_SECONDS = 300


@pytest.fixture(scope="module")
def night_inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("nightly")
    # Several catalogue files, streamed by Ray Data, so the night's files reach staging one after another and
    # the kill lands mid-write, not after the last file; 128 px makes each batch take a while.
    return {"catalog": write_sample_parts(root, MOVIES, PARTS, seed=5),
            "model": save_random_model(root / "model", image_size=128), "output": str(root / "labels")}


def label_command(inputs: dict[str, str]) -> list[str]:
    return [sys.executable, "jobs/label_catalog.py", "--catalog", inputs["catalog"], "--model", inputs["model"],
            "--output", inputs["output"], "--run-date", NIGHT, "--batch-size", "16"]


def start_job(inputs: dict[str, str]) -> subprocess.Popen:
    # Its own session, so the local Ray the driver starts can be cleaned up with the whole group afterwards.
    return subprocess.Popen(label_command(inputs), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
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


def wait_for_staged_file(output: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        if any((output / "_staging").rglob("*.parquet")):
            return
        time.sleep(0.05)
    output_text = process.stdout.read() if process.poll() is not None else "(still running)"
    raise AssertionError(f"no staged file before the job ended (exit {process.returncode}):\n{output_text[-3000:]}")


def night_rows(output: str) -> list[dict]:
    sql = f"SELECT run_id, count(*) AS rows, count(DISTINCT movie_id) AS movies FROM labels " \
          f"WHERE run_date = DATE '{NIGHT}' GROUP BY run_id"
    return run_query(output, sql).to_pylist()


def committed_run_id(output: str) -> str:
    rows = night_rows(output)
    assert len(rows) == 1 and rows[0]["rows"] == rows[0]["movies"] == MOVIES, rows
    return rows[0]["run_id"]


@pytest.mark.slow
def test_killed_run_leaves_the_night_whole_and_the_next_run_completes_it(night_inputs):
    output = Path(night_inputs["output"])
    finish(start_job(night_inputs))
    first = committed_run_id(str(output))

    killed = start_job(night_inputs)
    try:
        wait_for_staged_file(output, killed)
        killed.send_signal(signal.SIGKILL)  # the driver, mid-write
        killed.wait(timeout=30)
    finally:
        kill_group(killed)
    assert any((output / "_staging").rglob("*.parquet")), "the kill should have left staging debris"
    assert committed_run_id(str(output)) == first  # readers still see the whole previous run, and only it

    finish(start_job(night_inputs))
    rerun = committed_run_id(str(output))
    assert rerun != first
    assert not any((output / "_staging").rglob("*.parquet"))
