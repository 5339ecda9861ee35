"""Never lose or double a night of the labels table on local storage: the job killed at each step of its commit,
two runs overlapping in the commit, a killed night resumed without re-scoring, a systemic failure, a model
published or tampered with during a run, a block whose scoring raises. Each fault is injected into the real job
(a subprocess with its own local Ray) through a failpoint."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, labels_table, read_night, save_random_model, write_sample_parts

from genre_pipeline.failpoints import DIR_ENV_VAR, ENV_VAR
from genre_pipeline.model.checkpoints import publish_checkpoint

NIGHT = "2026-11-25"
MOVIES = 128
JOB_SECONDS = 240


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("commit")
    return {"catalog": write_sample_parts(root, MOVIES, 2, seed=4),
            "model": save_random_model(root / "model", image_size=32), "root": str(root)}


def start(inputs: dict[str, str], output: Path, *extra: str, failpoints: str = "",
          pause_dir: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, ENV_VAR: failpoints, DIR_ENV_VAR: str(pause_dir or "")}
    command = [sys.executable, "jobs/label_catalog.py", "--catalog", inputs["catalog"], "--model", inputs["model"],
               "--output", str(output), "--run-date", NIGHT, *extra]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=JOB_SECONDS)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)  # the local Ray it started
    return process.returncode, output


def run(inputs, output, *extra, failpoints: str = "") -> tuple[int, str]:
    return finish(start(inputs, output, *extra, failpoints=failpoints))


def night(output: Path) -> tuple[int, int, int]:
    """(snapshot id, rows, distinct movies) of the table's latest night."""
    table = read_night(output)
    return labels_table(output).current_snapshot().snapshot_id, table.num_rows, len(set(table["movie_id"].to_pylist()))


def staged_files(output: Path) -> list[Path]:
    return sorted((output / ".staging").rglob("*.parquet"))


def wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + JOB_SECONDS
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{path.name} never reached:\n{finish(process)[1][-3000:]}")
        time.sleep(0.05)


@pytest.mark.slow
def test_a_kill_at_any_commit_step_leaves_a_whole_night(inputs, tmp_path):
    output = tmp_path / "labels"
    code, log = run(inputs, output)
    assert code == 0, log[-3000:]
    committed = night(output)
    assert committed[1:] == (MOVIES, MOVIES)
    for step in ("commit.files_written", "commit.start", "commit.metadata_written", "commit.done"):
        code, log = run(inputs, output, failpoints=f"{step}=kill")
        assert code == -9, (step, log[-3000:])
        now = night(output)
        assert now[1:] == (MOVIES, MOVIES), step
        if step == "commit.done":
            assert now != committed  # killed after the catalog's commit: the new night is whole
        else:
            assert now == committed, step
        committed = now
    # a failing re-run (every poster refused: the guard) leaves the table as it is
    code, log = run(inputs, output, "--full", "--poster-root", str(tmp_path / "nowhere"))
    assert code == 2 and "more than --max-failed-fraction 0.2" in log
    assert night(output) == committed


@pytest.mark.slow
def test_of_two_runs_overlapping_in_the_commit_exactly_one_commits(inputs, tmp_path):
    output, pauses = tmp_path / "labels", tmp_path / "pauses"
    pauses.mkdir()
    code, log = run(inputs, output)
    assert code == 0, log[-3000:]
    runs = [start(inputs, output, "--full", failpoints="commit.start=pause", pause_dir=pauses) for _ in range(2)]
    reached = pauses / "commit.start.reached"
    deadline = time.monotonic() + JOB_SECONDS
    while not reached.exists() or len(reached.read_text().split()) < 2:  # both wrote their files
        assert time.monotonic() < deadline and all(r.poll() is None for r in runs), [finish(r)[1][-2000:] for r in runs]
        time.sleep(0.05)
    (pauses / "commit.start.release").touch()  # both commit at once
    results = sorted(finish(r) for r in runs)
    assert [code for code, _ in results] == [0, 2], [log[-3000:] for _, log in results]
    assert "another run committed" in results[1][1]
    table = read_night(output)
    assert table.num_rows == len(set(table["movie_id"].to_pylist())) == MOVIES
    (run_id,) = set(table["run_id"].to_pylist())  # one run's rows
    assert f"run {run_id}" not in results[1][1]
    history = labels_table(output).history()
    assert len(history) == 2  # the first night and the winner: the loser added no snapshot


@pytest.mark.slow
def test_a_night_killed_after_scoring_resumes_without_scoring_again(inputs, tmp_path):
    output = tmp_path / "labels"
    code, log = run(inputs, output, failpoints="commit.files_written=kill")
    assert code == -9, log[-3000:]
    assert staged_files(output), "the killed run staged its scored rows"
    code, log = run(inputs, output)
    assert code == 0, log[-3000:]
    assert f"scored 0, resumed {MOVIES}, carried 0" in log
    assert night(output)[1:] == (MOVIES, MOVIES)
    assert staged_files(output) == []  # the committed night's staging is removed


@pytest.mark.slow
def test_a_model_published_during_a_run_does_not_change_the_night(inputs, tmp_path):
    run_dir = tmp_path / "runs" / "nightly"
    old = save_random_model(tmp_path / "old", image_size=32, epoch=1)
    new = save_random_model(tmp_path / "new", image_size=32, epoch=2)
    publish_checkpoint(old, str(run_dir / "model"))
    model_inputs = {**inputs, "model": str(run_dir / "model")}
    output, pauses = tmp_path / "labels", tmp_path / "pauses"
    pauses.mkdir()
    job = start(model_inputs, output, failpoints="model.pinned=pause", pause_dir=pauses)
    wait_for(pauses / "model.pinned.reached", job)
    publish_checkpoint(new, str(run_dir / "model"))  # the pointer moves while the night is labelled
    (pauses / "model.pinned.release").touch()
    code, log = finish(job)
    assert code == 0, log[-3000:]
    versions = set(read_night(output)["model_version"].to_pylist())
    assert versions == {json.loads((Path(old) / "meta.json").read_text())["model_version"]}
    pointer = json.loads((run_dir / "model" / "pointer.json").read_text())
    assert pointer["model_version"].startswith("cnn-e2-")  # the next night gets the new one


@pytest.mark.slow
def test_a_model_meta_changed_after_pinning_is_refused_by_the_actors(inputs, tmp_path):
    model = Path(save_random_model(tmp_path / "model", image_size=32))
    output, pauses = tmp_path / "labels", tmp_path / "pauses"
    pauses.mkdir()
    job = start({**inputs, "model": str(model)}, output, failpoints="model.pinned=pause", pause_dir=pauses)
    wait_for(pauses / "model.pinned.reached", job)
    meta = json.loads((model / "meta.json").read_text())
    meta["thresholds"] = [0.01] * len(meta["thresholds"])  # thresholds swapped in the middle of a night
    (model / "meta.json").write_text(json.dumps(meta))
    (pauses / "model.pinned.release").touch()
    code, log = finish(job)
    assert code == 2 and "meta.json" in log, log[-3000:]
    assert labels_table(output).current_snapshot() is None  # nothing committed


@pytest.mark.slow
def test_tampered_weights_are_refused_before_any_work(inputs, tmp_path):
    model = Path(save_random_model(tmp_path / "model", image_size=32))
    weights = bytearray((model / "model.pt").read_bytes())
    weights[-100] ^= 0xFF
    (model / "model.pt").write_bytes(bytes(weights))
    code, log = run({**inputs, "model": str(model)}, tmp_path / "labels")
    assert code == 2 and "does not match" in log and "refusing them" in log
    assert not (tmp_path / "labels").exists()


@pytest.mark.slow
def test_blocks_whose_scoring_raises_become_inference_failed_rows(inputs, tmp_path):
    output = tmp_path / "labels"
    code, log = run(inputs, output, "--max-failed-fraction", "1", failpoints="labeller.score=raise")
    assert code == 0, log[-3000:]
    table = read_night(output)
    statuses = table["status"].to_pylist()
    with_poster = [uri is not None for uri in table["poster_uri"].to_pylist()]
    assert {s for s, has in zip(statuses, with_poster, strict=True) if has} == {"inference_failed"}
    assert table.num_rows == MOVIES
    errors = {e for e, s in zip(table["error"].to_pylist(), statuses, strict=True) if s == "inference_failed"}
    assert errors == {"scoring failed: FailpointError: failpoint labeller.score"}
    # with the default guard the same fault is a failed night: nothing committed, exit 2
    code, log = run(inputs, tmp_path / "guarded", failpoints="labeller.score=raise")
    assert code == 2 and "inference_failed" in log
    assert labels_table(tmp_path / "guarded").current_snapshot() is None
    assert not list((tmp_path / "guarded" / "genre_pipeline").rglob("*.parquet"))  # its data files removed
