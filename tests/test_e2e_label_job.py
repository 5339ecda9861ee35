"""The label job on a real local Ray: one row per movie, the contract's schema, statuses, re-runs."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import labels_table, load_job, save_random_model, write_sample_parts
from conftest import read_night as read_table_night

from genre_pipeline.cluster import ActorResources
from genre_pipeline.data.catalog import CATALOG_SCHEMA
from genre_pipeline.data.sample import draw_poster, jpeg_bytes
from genre_pipeline.genres import GENRES, score_columns
from genre_pipeline.label.actor import model_lock
from genre_pipeline.label.contract import labels_schema
from genre_pipeline.label.night import NightOrderError, label_catalog
from genre_pipeline.label.pipeline import (
    ActorResourcesError,
    KnownRows,
    LabelConfig,
    catalog_with_known_rows,
    resolve_actor_resources,
    scoring_blocks,
    size_label_cpu_actors,
)
from genre_pipeline.label.sizing import SCORE_BLOCK_ROWS
from genre_pipeline.label.table import nights
from genre_pipeline.model.predictor import load_predictor

GOOD_IDS = range(1, 9)
EXPECTED_STATUS = {**{i: "ok" for i in GOOD_IDS}, 20: "missing_poster", 21: "missing_poster",
                   22: "unreadable_poster", 23: "unreadable_poster", 24: "unreadable_poster"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    thresholds = np.linspace(0.2, 0.7, len(GENRES)).round(3).tolist()
    return save_random_model(tmp_path_factory.mktemp("model") / "model", thresholds=thresholds)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> str:
    """Eight good posters and every kind of bad one."""
    root = tmp_path_factory.mktemp("catalog")
    posters = root / "posters"
    posters.mkdir()
    rng = np.random.default_rng(0)
    for movie_id in GOOD_IDS:
        (posters / f"{movie_id}.jpg").write_bytes(jpeg_bytes(draw_poster(["Drama"], rng, (60, 90))))
    (posters / "22.jpg").write_bytes(jpeg_bytes(draw_poster(["Comedy"], rng, (60, 90)))[:300])  # truncated
    (posters / "23.jpg").write_bytes(b"")  # zero bytes
    (posters / "24.jpg").write_bytes(b"%PDF-1.4 not an image")
    uris = {i: str(posters / f"{i}.jpg") for i in [*GOOD_IDS, 21, 22, 23, 24]}  # 21.jpg does not exist
    ids = sorted(EXPECTED_STATUS)
    table = pa.table({"movie_id": ids, "title": [f"Movie {i}" for i in ids], "year": [2000] * len(ids),
                      "genres": [["Drama"]] * len(ids), "poster_uri": [uris.get(i) for i in ids],
                      "split": ["test"] * len(ids)}, schema=CATALOG_SCHEMA)
    pq.write_table(table, root / "catalog.parquet")
    return str(root / "catalog.parquet")


def read_night(output, run_date) -> pa.Table:
    return read_table_night(output, run_date).sort_by("movie_id")


def test_every_movie_once_with_its_status(ray_local, catalog, checkpoint, tmp_path):
    output = tmp_path / "labels"
    summary = label_catalog(LabelConfig(catalog=catalog, model=checkpoint, max_failed_fraction=1.0, output=str(output),
                                        run_date="2026-11-01", batch_size=4, actors=1))
    labels = read_night(output, "2026-11-01")
    assert labels.schema.names == labels_schema().names
    assert labels.cast(labels_schema()).num_rows == len(EXPECTED_STATUS)
    assert labels["movie_id"].to_pylist() == sorted(EXPECTED_STATUS)
    assert dict(zip(labels["movie_id"].to_pylist(), labels["status"].to_pylist(), strict=True)) == EXPECTED_STATUS
    assert summary.rows_by_status == {"ok": 8, "missing_poster": 2, "unreadable_poster": 3}
    rows = {row["movie_id"]: row for row in labels.to_pylist()}
    assert rows[20]["error"] == "no poster_uri" and rows[21]["error"].endswith("21.jpg: not found")
    assert "empty file" in rows[23]["error"] and rows[24]["error"].startswith(rows[24]["poster_uri"])
    assert all(rows[i]["score_drama"] is None and rows[i]["genres"] is None for i in (20, 22, 23, 24))
    assert {labels["run_id"][0].as_py()} == set(labels["run_id"].to_pylist()) == {summary.run_id}


def test_labels_apply_the_checkpoint_thresholds(ray_local, catalog, checkpoint, tmp_path):
    label_catalog(LabelConfig(catalog=catalog, model=checkpoint, max_failed_fraction=1.0, output=str(tmp_path),
                              run_date="2026-11-02"))
    labels = read_night(tmp_path, "2026-11-02")
    thresholds = np.linspace(0.2, 0.7, len(GENRES)).round(3)
    ok_rows = [row for row in labels.to_pylist() if row["status"] == "ok"]
    assert len(ok_rows) == len(GOOD_IDS)
    for row in ok_rows:
        scores = np.array([row[c] for c in score_columns()])
        assert scores.min() >= 0.0 and scores.max() <= 1.0
        assert row["genres"] == [g for g, s, t in zip(GENRES, scores, thresholds, strict=True) if s >= t]
        assert row["top_genre"] == GENRES[int(np.argmax(scores))]
        assert row["model_version"].startswith("cnn-e1-")


def test_rerunning_a_night_replaces_it_and_an_older_night_is_refused(ray_local, catalog, checkpoint, tmp_path):
    config = dict(catalog=catalog, model=checkpoint, output=str(tmp_path), max_failed_fraction=1.0)
    first = label_catalog(LabelConfig(**config, run_date="2026-11-03"))
    again = label_catalog(LabelConfig(**config, run_date="2026-11-03", full=True))
    night = read_night(tmp_path, "2026-11-03")
    assert night.num_rows == len(set(night["movie_id"].to_pylist())) == len(EXPECTED_STATUS)
    assert set(night["run_id"].to_pylist()) == {again.run_id} != {first.run_id}
    assert nights(labels_table(tmp_path)) == {"2026-11-03": again.snapshot_id}  # the tag moved to the re-run
    label_catalog(LabelConfig(**config, run_date="2026-11-04"))
    with pytest.raises(NightOrderError, match="2026-11-03 is older than the table's latest night 2026-11-04"):
        label_catalog(LabelConfig(**config, run_date="2026-11-03"))
    assert sorted(nights(labels_table(tmp_path))) == ["2026-11-03", "2026-11-04"]
    assert not any((tmp_path / ".staging").rglob("*.parquet"))  # committed nights leave no staged rows


def test_job_exit_codes_and_nothing_written_on_bad_input(ray_local, catalog, checkpoint, tmp_path, capsys):
    job = load_job("label_catalog")
    out = tmp_path / "labels"
    no_model = job.main(["--catalog", catalog, "--model", str(tmp_path / "nowhere"), "--output", str(out)])
    pq.write_table(pa.table({"movie_id": [1, 1], "title": ["a", "b"], "poster_uri": ["x", "y"]}),
                   tmp_path / "dup.parquet")
    duplicated = job.main(["--catalog", str(tmp_path / "dup.parquet"), "--model", checkpoint, "--output", str(out)])
    pq.write_table(pa.table({"movie_id": [1], "title": ["a"]}), tmp_path / "nocol.parquet")
    no_column = job.main(["--catalog", str(tmp_path / "nocol.parquet"), "--model", checkpoint, "--output", str(out)])
    assert (no_model, duplicated, no_column) == (2, 2, 2)
    assert not out.exists()
    ok = job.main(["--catalog", catalog, "--model", checkpoint, "--output", str(out), "--run-date", "2026-11-05",
                   "--max-failed-fraction", "1"])
    assert ok == 0
    assert "committed snapshot" in capsys.readouterr().out and nights(labels_table(out)).keys() == {"2026-11-05"}


def test_cpu_actors_share_the_node_and_leave_ray_data_a_cpu(ray_local, catalog, checkpoint):
    config = LabelConfig(catalog=catalog, model=checkpoint, output="unused", run_date="2026-11-01")
    # 2-CPU local Ray: by default a single-threaded actor per core, sharing the CPU Ray Data leaves
    assert resolve_actor_resources(config) == ActorResources(actors=2, cpus=0.5, threads=1)
    assert resolve_actor_resources(config, rows=1000) == ActorResources(actors=2, cpus=0.5, threads=1)
    # a catalogue of one block gets one actor, which then has the node's cores
    assert resolve_actor_resources(config, rows=60) == ActorResources(actors=1, cpus=1.0, threads=2)
    assert resolve_actor_resources(replace(config, actors=1)) == ActorResources(actors=1, cpus=1.0, threads=2)
    assert resolve_actor_resources(replace(config, actors=4)) == ActorResources(actors=4, cpus=0.25, threads=1)
    # no GPU in this cluster: a GPU pool could never start, so it is refused before any work
    with pytest.raises(ActorResourcesError, match="1 label actor of 1 GPU and 1 CPU: the cluster has 0 GPUs"):
        resolve_actor_resources(replace(config, num_gpus_per_actor=1))
    with pytest.raises(ActorResourcesError, match="--cpus-per-actor 2 x 2 actors per node"):
        resolve_actor_resources(replace(config, cpus_per_actor=2))


def test_cpu_pool_is_sized_from_the_nodes():
    config = LabelConfig(catalog="c", model="m", output="o", run_date="2026-11-01")
    # two 8-CPU nodes: 16 single-threaded actors sharing the 7 CPUs each node leaves after Ray Data's
    assert size_label_cpu_actors(config, [8.0, 8.0], rows=None) == ActorResources(actors=16, cpus=7 / 8, threads=1)
    # 3 blocks of rows: 3 actors, 2 on one node, each with half its cores
    assert size_label_cpu_actors(config, [8.0, 8.0], rows=150) == ActorResources(actors=3, cpus=3.5, threads=4)
    # nodes of different sizes: sized for the smallest
    assert size_label_cpu_actors(config, [4.0, 16.0], rows=None) == ActorResources(actors=8, cpus=0.75, threads=1)
    assert size_label_cpu_actors(replace(config, threads_per_actor=2), [4.0], rows=None).threads == 2


def test_a_one_cpu_node_is_refused_with_the_reason():
    config = LabelConfig(catalog="c", model="m", output="o", run_date="2026-11-01")
    with pytest.raises(ActorResourcesError, match="a 1-CPU node cannot score on CPUs: Ray Data's read tasks need 1"):
        size_label_cpu_actors(config, [1.0, 8.0], rows=None)


def test_actors_that_would_starve_ray_data_fail_fast(ray_local, catalog, checkpoint, tmp_path, caplog):
    job = load_job("label_catalog")
    out = tmp_path / "labels"
    code = job.main(["--catalog", catalog, "--model", checkpoint, "--output", str(out), "--cpus-per-actor", "2"])
    assert code == 2
    assert "leaves Ray Data less than the 1 CPU its read tasks need" in caplog.text
    assert not out.exists()


def test_a_night_is_written_in_few_large_data_files(ray_local, tmp_path):
    """Scored blocks (64 rows) are gathered into data files of up to WRITE_BLOCK_ROWS rows by the write tasks."""
    catalog = write_sample_parts(tmp_path, 700, 2, seed=3)
    model = save_random_model(tmp_path / "model", image_size=32)
    output = tmp_path / "labels"
    label_catalog(LabelConfig(catalog=catalog, model=model, output=str(output), run_date="2026-11-03"))
    files = [task.file for task in labels_table(output).scan().plan_files()]
    assert [data_file.record_count for data_file in files] == [700]


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--max-failed-fraction", "1.5", "must be between 0 and 1, got 1.5"),
    ("--max-poster-bytes", "0", "must be at least 1, got 0"),
    ("--cpus-per-actor", "0", "must be more than 0, got 0"),
    ("--num-gpus-per-actor", "-1", "must be 0 or more, got -1"),
    ("--batch-size", "-3", "must be at least 1, got -3"),
])
def test_numeric_flags_are_range_checked(flag, value, message, capsys):
    job = load_job("label_catalog")
    with pytest.raises(SystemExit):
        job.parse_config(["--catalog", "c", "--model", "m", "--output", "o", flag, value])
    assert f"{flag}: {message}" in capsys.readouterr().err


def test_reliability_flags_reach_the_config():
    job = load_job("label_catalog")
    config, _ = job.parse_config(["--catalog", "c", "--model", "m", "--output", "o", "--poster-root", "/a",
                                  "--poster-root", "s3://b/p", "--max-poster-bytes", "1000",
                                  "--max-failed-fraction", "0.5"])
    assert config.poster_roots == ("/a", "s3://b/p")
    assert (config.max_poster_bytes, config.max_failed_fraction) == (1000, 0.5)
    defaults, _ = job.parse_config(["--catalog", "c", "--model", "m", "--output", "o"])
    assert (defaults.poster_roots, defaults.max_failed_fraction) == ((), 0.2)


def test_the_catalogue_is_read_in_exact_blocks_without_a_footer_actor_pool(ray_local, tmp_path):
    """Every block but one has SCORE_BLOCK_ROWS rows (a short one would be bundled with the next into a
    call of twice the work), read by Ray Data's first Parquet reader: the default one starts 32 actors to read
    the footers of even one file (seconds of start-up on a small node)."""
    catalog = write_sample_parts(tmp_path, 700, 2, seed=3)
    context = ray_local.data.DataContext.get_current()
    default_reader = context.use_datasource_v2
    config = LabelConfig(catalog=catalog, model="m", output=str(tmp_path / "labels"), run_date="2026-11-01")
    blocks = scoring_blocks(catalog_with_known_rows(config, night_digest="night", known=KnownRows()))
    sizes = [len(block["movie_id"]) for block in blocks.iter_batches(batch_size=None)]
    assert SCORE_BLOCK_ROWS == 64 and sorted(sizes) == [60] + [64] * 10  # blocks stream in any order
    stats = blocks.stats()
    assert "ReadParquet" in stats and "ListFiles" not in stats
    assert context.use_datasource_v2 == default_reader  # the process's other reads keep Ray Data's default


def test_single_threaded_cpu_actors_score_both_calls_at_once(checkpoint):
    """A call waiting on the model lock would idle its core at the run's end; threads or a GPU need the lock."""
    assert isinstance(model_lock(load_predictor(checkpoint, device="cpu", num_threads=1)), contextlib.nullcontext)
    assert isinstance(model_lock(load_predictor(checkpoint, device="cpu", num_threads=2)), type(threading.Lock()))
