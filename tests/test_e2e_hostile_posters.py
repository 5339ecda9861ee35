"""A hostile catalogue: every poster a night can meet that must not hurt it gets a status row, and the job
commits the rest (real local Ray, the job's own entry point)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, load_job, read_night, save_random_model
from PIL import Image
from test_data_images import dds_header_only

from genre_pipeline.data import storage
from genre_pipeline.data.catalog import CATALOG_SCHEMA
from genre_pipeline.data.posters import PosterPolicy, fetch_one, fetch_posters, read_poster
from genre_pipeline.data.sample import draw_poster, jpeg_bytes

MAX_BYTES = 200_000
# The whole job (driver, a local Ray, its actors) in a memory cgroup of this size: about twice its peak here,
# far less than /dev/zero read to the end would take.
MEMORY_LIMIT_BYTES = 4 << 30
JOB_SECONDS = 300


def png_bomb() -> bytes:
    bomb = io.BytesIO()
    Image.new("1", (13_000, 13_000)).save(bomb, "PNG")  # ~20 KB that would decode to 169 million pixels
    return bomb.getvalue()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict:
    """A catalogue folder with good posters and, beside them, everything a catalogue row could point at."""
    root = tmp_path_factory.mktemp("hostile")
    posters, outside = root / "posters", root.parent / f"{root.name}-outside"
    posters.mkdir()
    outside.mkdir()
    rng = np.random.default_rng(1)
    uris: dict[int, str] = {}
    for movie_id in range(1, 61):  # good posters: the night must still be published
        path = posters / f"{movie_id}.jpg"
        path.write_bytes(jpeg_bytes(draw_poster(["Drama"], rng, (60, 90))))
        uris[movie_id] = str(path)
    (posters / "dds.jpg").write_bytes(dds_header_only())
    (posters / "bomb.png").write_bytes(png_bomb())
    (posters / "big.jpg").write_bytes(os.urandom(MAX_BYTES + 1))
    os.mkfifo(posters / "fifo.jpg")
    (outside / "secret.jpg").write_bytes(jpeg_bytes(draw_poster(["Drama"], rng, (60, 90))))
    (posters / "escape.jpg").symlink_to(outside / "secret.jpg")
    (posters / "zero.jpg").symlink_to("/dev/zero")
    hostile_uris = {
        101: (str(posters / "dds.jpg"), "unreadable_poster"),
        102: (str(posters / "bomb.png"), "unreadable_poster"),
        103: (str(posters / "big.jpg"), "refused_poster"),
        104: (str(posters / "fifo.jpg"), "refused_poster"),
        105: ("/dev/zero", "refused_poster"),
        106: ("/etc/passwd", "refused_poster"),
        107: (f"{posters}/../../{outside.name}/secret.jpg", "refused_poster"),
        108: ("file:///proc/self/environ", "refused_poster"),
        109: (str(posters / "escape.jpg"), "refused_poster"),
        110: (str(posters / "zero.jpg"), "refused_poster"),
    }
    expected = {movie_id: "ok" for movie_id in uris} | {i: status for i, (_, status) in hostile_uris.items()}
    uris |= {i: uri for i, (uri, _) in hostile_uris.items()}
    ids = sorted(uris)
    table = pa.table({"movie_id": ids, "title": [f"Movie {i}" for i in ids], "year": [2000] * len(ids),
                      "genres": [["Drama"]] * len(ids), "poster_uri": [uris[i] for i in ids],
                      "split": ["test"] * len(ids)}, schema=CATALOG_SCHEMA)
    pq.write_table(table, root / "catalog.parquet")
    return {"catalog": str(root / "catalog.parquet"), "model": save_random_model(root / "model"),
            "posters": posters, "outside": outside, "expected": expected, "root": root}


def test_every_hostile_poster_gets_a_status_and_the_night_commits(ray_local, hostile, tmp_path):
    output = tmp_path / "labels"
    code = load_job("label_catalog").main([
        "--catalog", hostile["catalog"], "--model", hostile["model"], "--output", str(output),
        "--run-date", "2026-11-30", "--max-poster-bytes", str(MAX_BYTES)])
    assert code == 0
    night = read_night(output, "2026-11-30").to_pylist()
    assert {row["movie_id"]: row["status"] for row in night} == hostile["expected"]
    errors = {row["movie_id"]: row["error"] for row in night}
    assert "outside the poster roots" in errors[106] and "outside the poster roots" in errors[107]
    assert "not a regular file" in errors[104]
    assert f"over --max-poster-bytes {MAX_BYTES:,}" in errors[103]
    assert "pixels is more than a poster's" in errors[102]


def memory_cgroup_parent() -> Path | None:
    """This process's cgroup v1 memory folder, when a child group can be made there (root); else None."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            return folder if (folder / "cgroup.procs").exists() and os.access(folder, os.W_OK) else None
    return None


@pytest.fixture
def memory_cgroup():
    parent = memory_cgroup_parent()
    if parent is None:
        pytest.skip("needs a writable cgroup v1 memory controller (root) to limit the job's memory")
    group = parent / f"genre-pipeline-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(MEMORY_LIMIT_BYTES))
    try:
        yield group
    finally:
        while pids := (group / "cgroup.procs").read_text().split():  # whatever the job left running
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.1)
        group.rmdir()


@pytest.mark.slow
def test_the_hostile_night_commits_under_a_memory_limit_within_a_time_bound(hostile, memory_cgroup, tmp_path):
    output = tmp_path / "labels"
    command = [sys.executable, "jobs/label_catalog.py", "--catalog", hostile["catalog"], "--model", hostile["model"],
               "--output", str(output), "--run-date", "2026-11-30", "--max-poster-bytes", str(MAX_BYTES)]

    def join_cgroup() -> None:  # in the child before exec: the job and everything it starts are in the group
        (memory_cgroup / "cgroup.procs").write_text(str(os.getpid()))

    job = subprocess.Popen(command, cwd=REPO, preexec_fn=join_cgroup, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = job.communicate(timeout=JOB_SECONDS)
    finally:
        job.kill()
    assert job.returncode == 0, log[-3000:]
    night = read_night(output, "2026-11-30").to_pylist()
    assert {row["movie_id"]: row["status"] for row in night} == hostile["expected"]
    oom = dict(line.split() for line in (memory_cgroup / "memory.oom_control").read_text().splitlines())
    assert oom.get("oom_kill", "0") == "0", f"a process of the job was OOM-killed: {oom}"
    peak = int((memory_cgroup / "memory.max_usage_in_bytes").read_text())
    print(f"peak memory of the job's cgroup: {peak / 2**20:.0f} MiB of {MEMORY_LIMIT_BYTES / 2**20:.0f} MiB")


def test_default_root_is_the_catalogue_folder_and_roots_are_checked_after_resolving(hostile):
    policy = PosterPolicy.under([str(hostile["root"])])
    inside = fetch_one(str(hostile["posters"] / "1.jpg"), storage.StorageOptions(), policy)
    assert inside[1] == "ok"
    for uri in (str(hostile["posters"] / "escape.jpg"), f"{hostile['posters']}/../../{hostile['outside'].name}/x"):
        data, status, error = fetch_one(uri, storage.StorageOptions(), policy)
        assert (data, status) == (None, "refused_poster") and "outside the poster roots" in error
    # a root given explicitly admits its posters, symlinked or not
    widened = PosterPolicy.under([str(hostile["root"]), str(hostile["outside"])])
    assert fetch_one(str(hostile["posters"] / "escape.jpg"), storage.StorageOptions(), widened)[1] == "ok"


def test_s3_keys_are_checked_after_folding_dot_dot():
    policy = PosterPolicy.under(["s3://bucket/posters"])
    for uri in ("s3://bucket/posters/../secrets/key.jpg", "s3://bucket/posters-other/a.jpg", "s3://other/posters/a"):
        with pytest.raises(Exception, match="outside the poster roots"):
            read_poster(uri, storage.StorageOptions(), policy)


def test_fetch_errors_are_written_without_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    data, status, error = fetch_one("https://user:p4ssw0rd@cdn.example/1.jpg", storage.StorageOptions(),
                                    PosterPolicy())
    assert (data, status) == (None, "fetch_failed")
    assert error == "https://***@cdn.example/1.jpg: StorageError: https://***@cdn.example/1.jpg: unsupported " \
                    "scheme 'https'; use a local path or s3://bucket/prefix"
    assert storage.redact("key s3cr3t-value in http://a:b@host/x") == "key *** in http://***@host/x"


@pytest.fixture
def refusing_endpoint():
    """An S3 endpoint URL on 127.0.0.1 that refuses connections: a socket bound but never listening."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{bound.getsockname()[1]}"


def test_the_error_column_carries_no_credential_of_any_form(refusing_endpoint, monkeypatch):
    """Each URI holds credentials in one form; the fetch fails and the library echoes the URI its own way."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTKEY")  # signing happens before connecting
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-Zq8Rk2")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # a refused connection fails at once, not after retries
    password = "Pw0rd/Tail@x:y%2Fz"
    uris = [f"s3://AKIAUSER:{password}@bucket/1.jpg",
            "s3://bucket/2.jpg?X-Amz-Credential=AKIAEXAMPLE%2F20261130%2Fus-east-1%2Fs3%2Faws4_request&"
            "X-Amz-Security-Token=FQoGZXIvYXdzEXAMPLE&X-Amz-Expires=900&X-Amz-Signature=5d672d79c15b1316",
            "s3://bucket/3.jpg?AWSAccessKeyId=AKIAV2EXAMPLE&Expires=1700000000&Signature=dGhp%2Bc2ln%3D",
            "s3://bucket/4.jpg?X-Goog-Signature=0a1b2c3d4e5f&sv=2022-11-02&sig=QXp1cmVTQVM%3D"]
    batch = fetch_posters({"poster_uri": np.array(uris, dtype=object)},
                          options=storage.StorageOptions(endpoint_url=refusing_endpoint), policy=PosterPolicy())
    assert list(batch["status"]) == ["fetch_failed"] * 4
    errors = list(batch["error"])
    assert errors[0].startswith('s3://***@bucket/1.jpg: ParamValidationError') and '"AKIAUSER:***"' in errors[0]
    assert errors[1].startswith("s3://bucket/2.jpg?X-Amz-Credential=***&X-Amz-Security-Token=***&X-Amz-Expires=900&"
                                "X-Amz-Signature=***: EndpointConnectionError")
    assert errors[2].startswith("s3://bucket/3.jpg?AWSAccessKeyId=***&Expires=1700000000&Signature=***: ")
    assert errors[3].startswith("s3://bucket/4.jpg?X-Goog-Signature=***&sv=2022-11-02&sig=***: ")
    for secret in ("Pw0rd", "Tail@x", "AKIAEXAMPLE", "FQoGZXIvYXdzEXAMPLE", "5d672d79", "AKIAV2EXAMPLE", "dGhp",
                   "0a1b2c3d4e5f", "QXp1cmVTQVM", "s3cr3t-value"):
        assert not [error for error in errors if secret in error], secret


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    data, status, error = fetch_one(str(tmp_path / "pipe.jpg"), storage.StorageOptions(), PosterPolicy())
    assert (data, status) == (None, "refused_poster") and "not a regular file" in error


def test_nothing_beyond_the_cap_is_read(tmp_path: Path):
    (tmp_path / "p.jpg").write_bytes(b"x" * 1000)
    assert read_poster(str(tmp_path / "p.jpg"), storage.StorageOptions(), PosterPolicy(max_bytes=1000)) == b"x" * 1000
    data, status, error = fetch_one(str(tmp_path / "p.jpg"), storage.StorageOptions(), PosterPolicy(max_bytes=999))
    assert (data, status) == (None, "refused_poster") and "1,000 bytes, over --max-poster-bytes 999" in error
