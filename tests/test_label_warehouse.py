"""The labels table read as a warehouse reads it: the documented queries through DuckDB (label/warehouse.py) and
the same results computed with Polars' `scan_iceberg`, time travel to an earlier night by its tag (pyiceberg,
Polars), readers that see committed nights only, and a reader polling through a commit that sees one whole night.

Two tables: one made by the real label job (two nights on the local Ray), one by `commit_night` with varied genres
and a night without signals (fast, and what the polling reader races against)."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import load_job, read_night, save_random_model
from pyiceberg.io.pyarrow import _dataframe_to_data_files

from genre_pipeline import failpoints
from genre_pipeline.data.catalog import write_catalog
from genre_pipeline.data.sample import build_sample_catalog
from genre_pipeline.genres import GENRES, score_columns
from genre_pipeline.label.contract import labels_schema
from genre_pipeline.label.night import label_catalog
from genre_pipeline.label.pipeline import LabelConfig
from genre_pipeline.label.table import (
    TableSettings,
    commit_night,
    load_table,
    night_tag,
    nights,
    open_table,
)
from genre_pipeline.label.warehouse import QUERIES, run_query

OPERATIONS_DOC = Path(__file__).resolve().parents[1] / "docs" / "operations.md"  # the warehouse's reference
NIGHTS = ("2026-11-01", "2026-11-02")
LATEST_COLUMNS = ["movie_id", "title", "genres", "top_genre", "signals", "status", "model_version"]
WAIT_SECONDS = 60  # bound on every wait for another thread: a hang fails the test instead of blocking it


@pytest.fixture(scope="module")
def job_table(ray_local, tmp_path_factory) -> dict:
    """The real label job: night 1 with a strict model (threshold 1.01: no genre), night 2 with a lenient one
    (0.0: every genre)."""
    root = tmp_path_factory.mktemp("warehouse")
    catalog = build_sample_catalog(str(root), 30, seed=3, poster_size=(48, 72))
    write_catalog(catalog, str(root / "catalog.parquet"))
    strict = save_random_model(root / "strict", thresholds=[1.01] * len(GENRES))
    lenient = save_random_model(root / "lenient", thresholds=[0.0] * len(GENRES))
    config = {"catalog": str(root / "catalog.parquet"), "output": str(root / "labels")}
    label_catalog(LabelConfig(**config, model=strict, run_date=NIGHTS[0]))
    label_catalog(LabelConfig(**config, model=lenient, run_date=NIGHTS[1]))
    ok_ids = [r["movie_id"] for r in catalog.to_pylist() if r["poster_uri"] is not None]
    return {"output": root / "labels", "catalog": catalog, "ok_ids": ok_ids}


def synthetic_rows(ids: range, run_date: str, *, seed: int, signals: bool = True) -> pa.Table:
    """Label rows of the contract with varied genres; a tenth of them not scored (fetch_failed)."""
    rng = np.random.default_rng(seed)
    scores = rng.random((len(ids), len(GENRES))).astype(np.float32)
    failed = rng.random(len(ids)) < 0.1
    genres = [None if bad else [g for g, s in zip(GENRES, row, strict=True) if s > 0.7]
              for row, bad in zip(scores, failed, strict=True)]
    columns = {
        "movie_id": pa.array(ids, pa.int64()), "title": [f"Movie {i}" for i in ids],
        "poster_uri": [f"s3://posters/{i}.jpg" for i in ids],
        **{name: pa.array(scores[:, g], pa.float32(), mask=failed) for g, name in enumerate(score_columns())},
        "genres": genres, "top_genre": [None if bad else GENRES[int(np.argmax(row))]
                                        for row, bad in zip(scores, failed, strict=True)],
        "signals": [None if not signals else [] if bad else ["poster"] for bad in failed],
        "status": ["fetch_failed" if bad else "ok" for bad in failed],
        "error": ["timed out" if bad else None for bad in failed],
        "model_version": [f"cnn-e{seed}-0123456789ab"] * len(ids),
        "labelled_at": [datetime.fromisoformat(f"{run_date}T03:00:00+00:00")] * len(ids),
        "run_id": [f"{run_date}-{seed:08x}"] * len(ids), "input_key": [None] * len(ids),
    }
    return pa.table(columns, schema=labels_schema())


def commit_rows(table, rows: pa.Table, run_date: str, *, files: int = 4) -> int:
    """Commit `rows` as the night `run_date`, in several data files (a partial view would show)."""
    size = -(-rows.num_rows // files)
    data_files = [data_file for part in range(files) for data_file in _dataframe_to_data_files(
        table_metadata=table.metadata, df=rows.slice(part * size, size), io=table.io)]
    return commit_night(table, table.current_snapshot(), data_files, run_date,
                        {"genre-pipeline.run-id": rows["run_id"][0].as_py()})


@pytest.fixture(scope="module")
def synthetic_table(tmp_path_factory) -> dict:
    """Two nights committed with commit_night: the first without signals (an older night), then 250 movies."""
    output = tmp_path_factory.mktemp("synthetic") / "labels"
    table = open_table(TableSettings(str(output)), labels_schema())
    commit_rows(table, synthetic_rows(range(1, 201), NIGHTS[0], seed=1, signals=False), NIGHTS[0])
    commit_rows(table, synthetic_rows(range(51, 301), NIGHTS[1], seed=2), NIGHTS[1])
    return {"output": output}


@pytest.fixture(params=["job_table", "synthetic_table"])
def any_table(request) -> dict:
    return request.getfixturevalue(request.param)


def settings_of(output: Path) -> TableSettings:
    return TableSettings(str(output))


# The documented queries through DuckDB, on the real job's labels.

def test_latest_label_per_movie(job_table):
    latest = run_query(settings_of(job_table["output"]), "latest")
    assert latest["movie_id"].to_pylist() == job_table["catalog"]["movie_id"].to_pylist()
    assert {str(d) for d in latest["run_date"].to_pylist()} == {NIGHTS[1]}


def test_movies_per_genre(job_table):
    per_genre = run_query(settings_of(job_table["output"]), "per_genre").to_pylist()
    # The lenient model predicts every genre for every movie with a poster.
    assert {row["genre"]: row["movies"] for row in per_genre} == {g: len(job_table["ok_ids"]) for g in GENRES}


def test_movies_whose_labels_changed(job_table):
    changed = run_query(settings_of(job_table["output"]), "changed")
    assert changed["movie_id"].to_pylist() == job_table["ok_ids"]
    assert all(before == [] for before in changed["before"].to_pylist())
    assert all(after == list(GENRES) for after in changed["after"].to_pylist())


def test_signals_query_counts_what_scored_the_newest_night(job_table):
    rows = {(r["signals"], r["status"]): r["movies"]
            for r in run_query(settings_of(job_table["output"]), "signals").to_pylist()}
    assert rows[("poster", "ok")] == len(job_table["ok_ids"])
    without = job_table["catalog"].num_rows - len(job_table["ok_ids"])
    assert sum(count for (signals, _), count in rows.items() if signals == "") == without


def test_each_night_has_one_row_per_movie(job_table):
    table = load_table(settings_of(job_table["output"]))
    assert sorted(nights(table)) == list(NIGHTS)
    movies = job_table["catalog"].num_rows
    for night in NIGHTS:
        ids = read_night(job_table["output"], night)["movie_id"].to_pylist()
        assert (len(ids), len(set(ids))) == (movies, movies), night


def test_query_labels_job_prints_a_documented_query(job_table, capsys):
    assert load_job("query_labels").main(["--labels", str(job_table["output"]), "--query", "per_genre"]) == 0
    out = capsys.readouterr().out
    assert f"({len(GENRES)} rows)" in out and "Film-Noir" in out


def test_readme_queries_are_the_tested_ones():
    normalise = lambda sql: " ".join(sql.replace(";", "").split())  # noqa: E731
    readme = normalise(OPERATIONS_DOC.read_text())
    for name, sql in QUERIES.items():
        assert normalise(sql) in readme, (
            f"docs/operations.md's '{name}' query differs from genre_pipeline/label/warehouse.py")


# Polars' scan_iceberg computes what DuckDB's queries return.

def polars_latest(source: pl.LazyFrame) -> list[dict]:
    return source.select(LATEST_COLUMNS).sort("movie_id").collect().to_dicts()


def polars_per_genre(source: pl.LazyFrame) -> list[dict]:
    return (source.select(pl.col("genres").explode().alias("genre")).drop_nulls()
            .group_by("genre").agg(pl.len().cast(pl.Int64).alias("movies"))
            .sort(["movies", "genre"], descending=[True, False]).collect().to_dicts())


def test_polars_scan_iceberg_matches_duckdb_on_latest_and_per_genre(any_table):
    settings = settings_of(any_table["output"])
    polars = pl.scan_iceberg(load_table(settings))
    duckdb_latest = run_query(settings, "latest").drop_columns(["run_date"]).to_pylist()
    assert polars_latest(polars) == duckdb_latest
    assert len(duckdb_latest) == load_table(settings).scan().count()
    duckdb_per_genre = run_query(settings, "per_genre").to_pylist()
    assert polars_per_genre(polars) == duckdb_per_genre
    assert duckdb_per_genre, "a night with predicted genres"


def test_duckdb_reads_a_night_without_signals_as_null(synthetic_table):
    """The first synthetic night has no signals (as nights migrated from before the column): DuckDB's view of
    the night before the latest reads it as null beside the latest night's lists."""
    rows = run_query(settings_of(synthetic_table["output"]),
                     "SELECT 'previous' AS night, count(*) AS movies, count(signals) AS with_signals "
                     "FROM previous_labels UNION ALL SELECT 'latest', count(*), count(signals) FROM labels "
                     "ORDER BY night").to_pylist()
    assert [(r["night"], r["movies"], r["with_signals"]) for r in rows] == [("latest", 250, 250),
                                                                           ("previous", 200, 0)]


# Time travel to an earlier night by its tag.

def test_time_travel_to_an_earlier_night_by_its_tag(job_table):
    table = load_table(settings_of(job_table["output"]))
    tagged = table.refs()[night_tag(NIGHTS[0])].snapshot_id
    assert tagged != table.current_snapshot().snapshot_id
    first = table.scan(snapshot_id=tagged).to_arrow().sort_by("movie_id")
    # The strict model predicted nothing: scored movies have an empty list, the others none.
    genres = dict(zip(first["movie_id"].to_pylist(), first["genres"].to_pylist(), strict=True))
    assert {m for m, g in genres.items() if g == []} == set(job_table["ok_ids"])
    assert all(g is None for m, g in genres.items() if m not in job_table["ok_ids"])

    polars_first = pl.scan_iceberg(table, snapshot_id=tagged).sort("movie_id").collect()
    assert polars_first.to_dicts() == first.to_pylist()
    polars_latest_genres = pl.scan_iceberg(table).filter(pl.col("status") == "ok").select("genres").collect()
    assert polars_latest_genres["genres"].to_list() == [list(GENRES)] * len(job_table["ok_ids"])
    # DuckDB's view of the night before the latest is that same night.
    previous = run_query(settings_of(job_table["output"]), "SELECT * FROM previous_labels ORDER BY movie_id")
    assert previous.drop_columns(["run_date"]).to_pylist() == first.to_pylist()


def test_readers_see_committed_nights_only(synthetic_table, tmp_path):
    """Files of a run that did not commit (its staged rows, data files written in the table's folder) are in
    no snapshot: no reader of the table sees them."""
    output = synthetic_table["output"]
    table = load_table(settings_of(output))
    stray = synthetic_rows(range(1000, 1100), "2026-11-03", seed=3)
    staging = Path(settings_of(output).staging) / "run_date=2026-11-03"
    staging.mkdir(parents=True)
    pq.write_table(stray, staging / "scored.parquet")
    orphans = list(_dataframe_to_data_files(table_metadata=table.metadata, df=stray, io=table.io))
    try:
        assert all(Path(f.file_path.removeprefix("file://")).exists() for f in orphans)
        assert run_query(settings_of(output), "SELECT count(*) AS n, max(movie_id) AS top FROM labels") \
            .to_pylist() == [{"n": 250, "top": 300}]
        assert pl.scan_iceberg(load_table(settings_of(output))).select(pl.len()).collect().item() == 250
        assert read_night(output)["movie_id"].to_pylist() == list(range(51, 301))
    finally:
        for data_file in orphans:
            table.io.delete(data_file.file_path)
        (staging / "scored.parquet").unlink()


# A reader polling through a commit.

class PausingFailpoints:
    """Stands in for failpoints.reached: the commit stops where its new metadata is written but not committed,
    until the test releases it, and says when it is done."""

    def __init__(self) -> None:
        self.paused, self.release, self.done = threading.Event(), threading.Event(), threading.Event()

    def reached(self, name: str) -> None:
        if name == "commit.metadata_written":
            self.paused.set()
            assert self.release.wait(WAIT_SECONDS), "the test never released the commit"
        elif name == "commit.done":
            self.done.set()


def current_rows(settings: TableSettings, engine: str) -> Counter:
    """What a reader sees when it opens the table now: (movie_id, run_id) pairs, with their multiplicity."""
    table = load_table(settings)
    if engine == "polars":
        rows = pl.scan_iceberg(table).select("movie_id", "run_id").collect().rows()
    else:
        rows = table.scan(selected_fields=("movie_id", "run_id")).to_arrow().to_pylist()
        rows = [(row["movie_id"], row["run_id"]) for row in rows]
    return Counter(rows)


def test_a_reader_polling_through_a_commit_sees_the_old_night_or_the_new_one(tmp_path, monkeypatch):
    settings = settings_of(tmp_path / "labels")
    table = open_table(settings, labels_schema())
    old_rows = synthetic_rows(range(1, 201), NIGHTS[0], seed=1)
    new_rows = synthetic_rows(range(51, 301), NIGHTS[1], seed=2)
    commit_rows(table, old_rows, NIGHTS[0])
    old, new = (Counter(zip(r["movie_id"].to_pylist(), r["run_id"].to_pylist(), strict=True))
                for r in (old_rows, new_rows))
    points = PausingFailpoints()
    monkeypatch.setattr(failpoints, "reached", points.reached)

    seen: list[tuple[str, str, str]] = []  # (the commit's phase when a read began, when it ended, what it saw)
    reads = threading.Condition()
    errors: list[BaseException] = []

    def phase() -> str:
        for name, event in (("done", points.done), ("committing", points.release), ("paused", points.paused)):
            if event.is_set():
                return name
        return "before"

    def poll() -> None:
        try:
            for attempt in range(2000):  # bounded: ends 3 reads after the commit is done
                began = phase()
                rows = current_rows(settings, "polars" if attempt % 2 else "pyiceberg")
                night = "old" if rows == old else "new" if rows == new else f"mixed: {sorted(rows)[:5]}..."
                with reads:
                    seen.append((began, phase(), night))
                    reads.notify_all()
                if sum(began == "done" for began, _, _ in seen) == 3:
                    return
        except BaseException as error:  # noqa: BLE001 - re-raised by the test thread
            errors.append(error)

    def paused_reads() -> int:  # reads made entirely while the commit was paused
        return sum(began == ended == "paused" for began, ended, _ in seen)

    reader = threading.Thread(target=poll)
    committer = threading.Thread(target=commit_rows, args=(table, new_rows, NIGHTS[1]))
    reader.start()
    committer.start()
    assert points.paused.wait(WAIT_SECONDS)
    with reads:  # the new night's files are written and its metadata too: readers must still see the old night
        assert reads.wait_for(lambda: paused_reads() >= 3 or errors, WAIT_SECONDS)
    points.release.set()
    committer.join(WAIT_SECONDS)
    reader.join(WAIT_SECONDS)
    assert not committer.is_alive() and not reader.is_alive() and not errors, errors

    nights_seen = [night for _, _, night in seen]
    assert set(nights_seen) <= {"old", "new"}, seen  # never a mix
    assert all(night == "old" for _, ended, night in seen if ended in ("before", "paused")), seen
    assert [night for began, _, night in seen if began == "done"] == ["new"] * 3
    first_new = nights_seen.index("new")
    assert nights_seen[first_new:] == ["new"] * (len(seen) - first_new)  # once the new night shows, it stays
    assert paused_reads() >= 3
    assert sorted(nights(load_table(settings))) == list(NIGHTS)
