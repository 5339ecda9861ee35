"""jobs/migrate_labels.py: nights of the old Hive-partitioned layout become tagged snapshots of the labels table
with their original rows (label/migrate.py); a re-run migrates nothing twice; what cannot be migrated safely is
refused with exit 2 before the table changes."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import labels_table, load_job, read_night, save_random_model

from genre_pipeline.data.catalog import write_catalog
from genre_pipeline.data.sample import build_sample_catalog
from genre_pipeline.genres import score_columns
from genre_pipeline.label.contract import labels_schema
from genre_pipeline.label.night import label_catalog
from genre_pipeline.label.pipeline import LabelConfig
from genre_pipeline.label.table import NoNightError, TableSettings, night_properties, night_snapshot, nights
from genre_pipeline.label.warehouse import run_query

NIGHTS = ("2026-11-01", "2026-11-02", "2026-11-03")
NIGHT_IDS = {NIGHTS[0]: range(1, 6), NIGHTS[1]: range(1, 7), NIGHTS[2]: range(2, 7)}  # movie 1 leaves on the 3rd


def label_rows(ids, run_date: str, *, model_version: str = "cnn-e1-0123456789ab") -> pa.Table:
    """Label rows of the contract for `ids`, as the label job wrote them on `run_date`."""
    run_id = f"{run_date}-{int(run_date[-2:]):08x}"
    labelled_at = datetime.fromisoformat(f"{run_date}T02:{int(run_date[-2:]):02d}:07.123456+00:00")
    rows = []
    for movie in ids:
        failed = movie == 4 and run_date == NIGHTS[1]  # a poster the store could not serve that night
        scores = {column: None if failed else round((movie * 7 + g) % 10 / 10, 1)
                  for g, column in enumerate(score_columns())}
        genres = None if failed else ["Drama"] if (movie + int(run_date[-2:])) % 2 else ["Comedy", "Drama"]
        rows.append({"movie_id": movie, "title": f"Movie {movie}", "poster_uri": f"s3://posters/{movie}.jpg",
                     **scores, "genres": genres, "top_genre": None if failed else "Drama",
                     "signals": [] if failed else ["poster"], "status": "fetch_failed" if failed else "ok",
                     "error": "s3://posters/4.jpg: timed out" if failed else None, "model_version": model_version,
                     "labelled_at": labelled_at, "run_id": run_id, "input_key": None})
    return pa.Table.from_pylist(rows, schema=labels_schema())


def old_night(rows: pa.Table, run_date: str) -> pa.Table:
    """The columns the old layout had that night: no input_key, and no signals before the 2nd."""
    rows = rows.drop_columns(["input_key"])
    return rows.drop_columns(["signals"]) if run_date == NIGHTS[0] else rows


def write_hive_night(root: Path, run_date: str, rows: pa.Table, *, files: int = 1) -> None:
    folder = root / f"run_date={run_date}"
    folder.mkdir(parents=True)
    size = -(-rows.num_rows // files)
    for part in range(files):
        pq.write_table(old_night(rows, run_date).slice(part * size, size), folder / f"part-{part}.parquet")


@pytest.fixture()
def hive(tmp_path) -> dict:
    """Three nights of the old layout: the 1st without signals, the 2nd in two files."""
    root = tmp_path / "old-labels"
    expected = {night: label_rows(NIGHT_IDS[night], night) for night in NIGHTS}
    for night, rows in expected.items():
        write_hive_night(root, night, rows, files=2 if night == NIGHTS[1] else 1)
    return {"root": root, "output": tmp_path / "warehouse", "expected": expected}


def migrate(source: Path, output: Path, *extra: str) -> int:
    return load_job("migrate_labels").main(["--from", str(source), "--output", str(output), *extra])


def sorted_rows(table: pa.Table) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda row: row["movie_id"])


def test_each_night_becomes_a_tagged_snapshot_with_its_original_rows(hive):
    assert migrate(hive["root"], hive["output"]) == 0

    table = labels_table(hive["output"])
    assert sorted(nights(table)) == list(NIGHTS)
    assert night_snapshot(table).snapshot_id == nights(table)[NIGHTS[-1]]  # the newest night is the current one
    for night, expected in hive["expected"].items():
        rows = read_night(hive["output"], night)  # time travel by the night's tag
        if night == NIGHTS[0]:
            expected = expected.set_column(expected.schema.get_field_index("signals"), "signals",
                                           pa.nulls(expected.num_rows, pa.list_(pa.string())))
        assert sorted_rows(rows) == sorted_rows(expected), night  # labelled_at, run_id, scores: unchanged
        assert rows.column("input_key").null_count == rows.num_rows


def test_each_night_records_its_run_model_and_counts(hive):
    assert migrate(hive["root"], hive["output"]) == 0

    table = labels_table(hive["output"])
    summaries = {night: night_properties(night_snapshot(table, night)) for night in NIGHTS}
    assert summaries[NIGHTS[1]] == {
        "genre-pipeline.run-date": NIGHTS[1], "genre-pipeline.run-id": "2026-11-02-00000002",
        "genre-pipeline.model-version": "cnn-e1-0123456789ab", "genre-pipeline.rows": "6",
        "genre-pipeline.removed": "0", "genre-pipeline.status.ok": "5", "genre-pipeline.status.fetch_failed": "1",
        "genre-pipeline.migrated-from": str(hive["root"] / f"run_date={NIGHTS[1]}")}
    assert summaries[NIGHTS[2]]["genre-pipeline.removed"] == "1"  # movie 1 left the catalogue that night
    assert [summaries[night]["genre-pipeline.rows"] for night in NIGHTS] == ["5", "6", "5"]
    # One overwrite snapshot per night, each the child of the night before.
    snapshots = [night_snapshot(table, night) for night in NIGHTS]
    assert [s.summary.operation.value for s in snapshots] == ["append", "overwrite", "overwrite"]
    assert [s.parent_snapshot_id for s in snapshots[1:]] == [s.snapshot_id for s in snapshots[:-1]]


def test_the_warehouse_queries_read_the_migrated_nights(hive):
    """The latest night and the night before it, as the documented queries see them."""
    assert migrate(hive["root"], hive["output"]) == 0
    settings = TableSettings(str(hive["output"]))

    changed = run_query(settings, "changed").to_pylist()
    before, after = (sorted_rows(hive["expected"][night]) for night in NIGHTS[1:])
    before = {row["movie_id"]: row["genres"] for row in before}
    assert [(r["movie_id"], r["before"], r["after"]) for r in changed] == [
        (row["movie_id"], before[row["movie_id"]], row["genres"]) for row in after
        if row["genres"] != before[row["movie_id"]]]
    assert {str(d) for d in run_query(settings, "SELECT DISTINCT run_date FROM labels")["run_date"].to_pylist()} \
        == {NIGHTS[2]}


def test_a_rerun_migrates_nothing_twice_and_then_only_new_nights(hive, capsys):
    assert migrate(hive["root"], hive["output"]) == 0
    snapshots = len(labels_table(hive["output"]).snapshots())

    assert migrate(hive["root"], hive["output"]) == 0
    assert len(labels_table(hive["output"]).snapshots()) == snapshots
    assert "0 nights migrated" in capsys.readouterr().out

    late = label_rows(range(2, 8), "2026-11-04")
    write_hive_night(hive["root"], "2026-11-04", late)
    assert migrate(hive["root"], hive["output"]) == 0
    table = labels_table(hive["output"])
    assert len(table.snapshots()) == snapshots + 1
    assert sorted(nights(table)) == [*NIGHTS, "2026-11-04"]
    assert sorted_rows(read_night(hive["output"])) == sorted_rows(late)
    assert sorted_rows(read_night(hive["output"], NIGHTS[0]))[0]["run_id"] == "2026-11-01-00000001"


def test_a_night_older_than_the_tables_latest_is_refused(hive, tmp_path, caplog):
    newest_only = tmp_path / "newest-only"
    write_hive_night(newest_only, NIGHTS[2], hive["expected"][NIGHTS[2]])
    assert migrate(newest_only, hive["output"]) == 0
    table = labels_table(hive["output"])
    before = (table.current_snapshot().snapshot_id, len(table.snapshots()))

    assert migrate(hive["root"], hive["output"]) == 2
    assert f"its latest night is {NIGHTS[2]}" in caplog.text
    assert f"the nights {NIGHTS[0]}, {NIGHTS[1]} to migrate are older" in caplog.text
    table = labels_table(hive["output"])
    assert (table.current_snapshot().snapshot_id, len(table.snapshots())) == before
    assert sorted(nights(table)) == [NIGHTS[2]]


@pytest.mark.parametrize("across_files", [False, True])
def test_a_night_with_a_repeated_movie_is_refused_before_anything_is_committed(hive, caplog, across_files):
    folder = hive["root"] / f"run_date={NIGHTS[1]}"
    if across_files:  # part-1 repeats a movie of part-0
        part = pq.read_table(folder / "part-1.parquet")
        pq.write_table(pa.concat_tables([part, pq.read_table(folder / "part-0.parquet").slice(0, 1)]),
                       folder / "part-1.parquet")
    else:
        part = pq.read_table(folder / "part-0.parquet")
        pq.write_table(pa.concat_tables([part, part.slice(1, 1)]), folder / "part-0.parquet")

    with caplog.at_level(logging.ERROR):
        assert migrate(hive["root"], hive["output"]) == 2
    if across_files:
        assert f"{folder / 'part-1.parquet'}: movie_id 1 of night {NIGHTS[1]} is also in " \
               f"{folder / 'part-0.parquet'}" in caplog.text
    else:
        assert f"{folder / 'part-0.parquet'}: movie_id 2 appears 2 times in night {NIGHTS[1]}" in caplog.text
    with pytest.raises(NoNightError):  # the 1st night was fine, and still not committed: no table at all
        labels_table(hive["output"])


def test_a_column_the_table_lacks_a_folder_that_is_no_night_or_no_nights_at_all_are_refused(hive, tmp_path,
                                                                                             caplog):
    assert migrate(tmp_path / "empty", hive["output"]) == 2
    assert "no run_date=YYYY-MM-DD folders" in caplog.text

    bad = tmp_path / "bad-date"
    write_hive_night(bad, "2026-13-01", hive["expected"][NIGHTS[0]])
    assert migrate(bad, hive["output"]) == 2
    assert f"{bad / 'run_date=2026-13-01'}: not a night's folder" in caplog.text

    path = hive["root"] / f"run_date={NIGHTS[0]}" / "part-0.parquet"
    rows = pq.read_table(path)
    pq.write_table(rows.append_column("reviewer", pa.array(["x"] * rows.num_rows)), path)
    assert migrate(hive["root"], hive["output"]) == 2
    assert f"{path}: night {NIGHTS[0]} has columns the labels table does not: ['reviewer']" in caplog.text


@pytest.mark.slow
def test_the_next_label_night_rescores_the_migrated_movies(ray_local, tmp_path):
    """Migrated rows have no input_key: the first label night after the migration scores every movie, then
    carries them over; the migrated night stays readable by its tag."""
    catalog = build_sample_catalog(str(tmp_path), 12, seed=5, poster_size=(48, 72))
    write_catalog(catalog, str(tmp_path / "catalog.parquet"))
    old = tmp_path / "old-labels"
    migrated = label_rows(catalog["movie_id"].to_pylist(), NIGHTS[0])
    write_hive_night(old, NIGHTS[0], migrated)
    output = tmp_path / "warehouse"
    assert migrate(old, output) == 0

    config = {"catalog": str(tmp_path / "catalog.parquet"), "model": save_random_model(tmp_path / "model"),
              "output": str(output), "poster_roots": (str(tmp_path),)}
    first = label_catalog(LabelConfig(**config, run_date=NIGHTS[1]))
    assert first.rows_by_origin == {"scored": catalog.num_rows} and first.removed == 0
    assert label_catalog(LabelConfig(**config, run_date=NIGHTS[2])).rows_by_origin == {"carried": catalog.num_rows}
    assert sorted_rows(read_night(output, NIGHTS[0]))[0]["run_id"] == migrated["run_id"][0].as_py()
