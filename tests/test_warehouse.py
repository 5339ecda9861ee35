"""Several nights of labels queried with DuckDB, and the documented DDL checked against the real Parquet."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import polars
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import save_random_model

from genre_pipeline.data.catalog import write_catalog
from genre_pipeline.data.sample import build_sample_catalog
from genre_pipeline.genres import GENRES
from genre_pipeline.label.commit import LABELS_FILE, NightStore
from genre_pipeline.label.pipeline import LabelConfig, label_catalog
from genre_pipeline.label.warehouse import QUERIES, run_query

OPERATIONS_DOC = Path(__file__).resolve().parents[1] / "docs" / "operations.md"  # the warehouse's reference
NIGHTS = ("2026-11-01", "2026-11-02")


@pytest.fixture(scope="module")
def nights(ray_local, tmp_path_factory):
    """Night 1 with a strict model (threshold 1.01: no genre), night 2 run twice with a lenient one (0.0: all)."""
    root = tmp_path_factory.mktemp("warehouse")
    table = build_sample_catalog(str(root), 30, seed=3, poster_size=(48, 72))
    write_catalog(table, str(root / "catalog.parquet"))
    strict = save_random_model(root / "strict", thresholds=[1.01] * len(GENRES))
    lenient = save_random_model(root / "lenient", thresholds=[0.0] * len(GENRES))
    config = {"catalog": str(root / "catalog.parquet"), "output": str(root / "labels")}
    label_catalog(LabelConfig(**config, model=strict, run_date=NIGHTS[0]))
    label_catalog(LabelConfig(**config, model=lenient, run_date=NIGHTS[1]))
    label_catalog(LabelConfig(**config, model=lenient, run_date=NIGHTS[1]))
    leave_a_run_in_progress(root / "labels", NIGHTS[1])
    ok_ids = [r["movie_id"] for r in table.to_pylist() if r["poster_uri"] is not None]
    return root / "labels", table, ok_ids


def leave_a_run_in_progress(labels: Path, night: str) -> None:
    """A run of `night` mid-way (or killed): its spool holds rows of that night and is not committed."""
    committed = pq.read_table(labels / f"run_date={night}" / LABELS_FILE)
    store = NightStore(str(labels), night, f"{night}-inprogress")
    spool = store.open_spool(committed.schema)
    spool.write(committed)
    spool.writer.close()


def count_by_night(rows: list[dict]) -> dict[str, tuple[int, int]]:
    """run_date -> (rows, distinct movies)."""
    nights: dict[str, list] = {}
    for row in rows:
        nights.setdefault(str(row["run_date"]), []).append(row["movie_id"])
    return {night: (len(ids), len(set(ids))) for night, ids in sorted(nights.items())}


def test_readers_of_the_labels_root_see_the_committed_nights_only(nights):
    """What a warehouse team points at the root, with a run of the second night in progress beside it."""
    labels, catalog, _ = nights
    whole = {night: (catalog.num_rows, catalog.num_rows) for night in NIGHTS}
    readers = {
        "duckdb, the documented glob": run_query(str(labels), "SELECT movie_id, run_date FROM labels").to_pylist(),
        "duckdb, a recursive glob": duckdb.sql(
            f"SELECT movie_id, run_date FROM read_parquet('{labels}/**/*.parquet', hive_partitioning = true)"
        ).fetch_arrow_table().to_pylist(),
        "polars, the root": polars.scan_parquet(labels, hive_partitioning=True).select(
            "movie_id", "run_date").collect().to_dicts(),
        "polars, a recursive glob": polars.scan_parquet(f"{labels}/**/*.parquet", hive_partitioning=True).select(
            "movie_id", "run_date").collect().to_dicts(),
        "pyarrow dataset, hive partitioning": pads.dataset(labels, format="parquet", partitioning="hive").to_table(
            columns=["movie_id", "run_date"]).to_pylist(),
    }
    assert list((labels.parent / f".{labels.name}.staging").glob("*.parquet")), "the run in progress has a spool"
    for reader, rows in readers.items():
        assert count_by_night(rows) == whole, reader


def test_latest_label_per_movie(nights):
    labels, catalog, _ = nights
    latest = run_query(str(labels), "latest")
    assert latest["movie_id"].to_pylist() == catalog["movie_id"].to_pylist()
    assert {str(d) for d in latest["run_date"].to_pylist()} == {NIGHTS[1]}


def test_movies_per_genre(nights):
    labels, _, ok_ids = nights
    per_genre = run_query(str(labels), "per_genre").to_pylist()
    # The lenient model predicts every genre for every movie with a poster.
    assert {row["genre"]: row["movies"] for row in per_genre} == {g: len(ok_ids) for g in GENRES}


def test_movies_whose_labels_changed(nights):
    labels, _, ok_ids = nights
    changed = run_query(str(labels), "changed")
    assert changed["movie_id"].to_pylist() == ok_ids
    assert all(before == [] for before in changed["before"].to_pylist())
    assert all(after == list(GENRES) for after in changed["after"].to_pylist())


def test_each_night_has_one_row_per_movie(nights):
    labels, catalog, _ = nights
    counts = run_query(str(labels), "SELECT run_date, count(*) AS n, count(DISTINCT movie_id) AS d "
                                    "FROM labels GROUP BY run_date ORDER BY run_date").to_pylist()
    assert [(str(r["run_date"]), r["n"], r["d"]) for r in counts] == [(n, catalog.num_rows, catalog.num_rows)
                                                                     for n in NIGHTS]


HIVE_TO_ARROW = {"bigint": pa.int64(), "string": pa.string(), "float": pa.float32(),
                 "array<string>": pa.list_(pa.string()), "timestamp": pa.timestamp("us", tz="UTC")}


def readme_ddl() -> tuple[list[tuple[str, str]], str]:
    text = OPERATIONS_DOC.read_text()
    body = re.search(r"CREATE EXTERNAL TABLE genre_labels \((.*?)\n\)\nPARTITIONED BY \((.*?)\)", text, re.S)
    assert body, "docs/operations.md lost its CREATE EXTERNAL TABLE statement"
    columns = [tuple(line.strip().rstrip(",").split(" ", 1)) for line in body.group(1).strip().splitlines()]
    return columns, body.group(2)


def test_readme_ddl_matches_the_parquet_the_job_writes(nights):
    labels, _, _ = nights
    written = pq.read_schema(labels / f"run_date={NIGHTS[1]}" / LABELS_FILE)
    columns, partition = readme_ddl()
    assert [name for name, _ in columns] == written.names
    for name, hive_type in columns:
        assert HIVE_TO_ARROW[hive_type] == written.field(name).type, name
    assert partition == "run_date string"


def test_readme_queries_are_the_tested_ones():
    normalise = lambda sql: " ".join(sql.replace(";", "").split())  # noqa: E731
    readme = normalise(OPERATIONS_DOC.read_text())
    for name, sql in QUERIES.items():
        assert normalise(sql) in readme, (
            f"docs/operations.md's '{name}' query differs from genre_pipeline/label/warehouse.py")


def test_signals_query_counts_what_scored_the_newest_night(nights):
    labels, catalog, ok_ids = nights
    rows = {(r["signals"], r["status"]): r["movies"] for r in run_query(str(labels), "signals").to_pylist()}
    assert rows[("poster", "ok")] == len(ok_ids)
    assert sum(count for (signals, _), count in rows.items() if signals == "") == catalog.num_rows - len(ok_ids)


def test_a_night_written_before_the_signals_column_reads_it_as_null(nights, tmp_path):
    """Nights of an earlier release (no `signals` column) stay queryable beside newer ones."""
    labels, catalog, _ = nights
    old = tmp_path / "labels"
    for night in NIGHTS:
        table = pq.read_table(labels / f"run_date={night}" / LABELS_FILE)
        if night == NIGHTS[0]:
            table = table.drop_columns(["signals"])
        (old / f"run_date={night}").mkdir(parents=True)
        pq.write_table(table, old / f"run_date={night}" / LABELS_FILE)
    rows = run_query(str(old), "SELECT run_date, count(*) AS movies, count(signals) AS with_signals FROM labels "
                               "GROUP BY run_date ORDER BY run_date").to_pylist()
    assert [(str(r["run_date"]), r["movies"], r["with_signals"]) for r in rows] == [
        (NIGHTS[0], catalog.num_rows, 0), (NIGHTS[1], catalog.num_rows, catalog.num_rows)]
