"""Incremental nights on the labels table (label/night.py, label/incremental.py, label/table.py), in process on
the shared local Ray: each kind of change re-scores exactly its movies, the rest keep their rows; the shrink
guard; one snapshot per night with its summary and tag; time travel to any earlier night."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import labels_table, read_night, save_random_model

from genre_pipeline.data.catalog import write_catalog
from genre_pipeline.data.sample import build_sample_catalog
from genre_pipeline.label.catalog_ids import EmptyCatalogError
from genre_pipeline.label.night import ShrinkingNightError, label_catalog
from genre_pipeline.label.pipeline import LabelConfig
from genre_pipeline.label.table import nights

MOVIES = 60


@pytest.fixture()
def workspace(tmp_path) -> dict:
    table = build_sample_catalog(str(tmp_path), MOVIES, seed=3, poster_size=(48, 72))
    catalog = tmp_path / "catalog" / "catalog.parquet"
    write_catalog(table, str(catalog))
    model = save_random_model(tmp_path / "model", image_size=32)
    return {"root": tmp_path, "table": table, "catalog": str(catalog), "model": model,
            "output": str(tmp_path / "labels")}


def night(workspace: dict, run_date: str, **settings) -> object:
    config = LabelConfig(catalog=workspace["catalog"], model=settings.pop("model", workspace["model"]),
                         output=workspace["output"], run_date=run_date, poster_roots=(str(workspace["root"]),),
                         **settings)
    return label_catalog(config)


def rows_by_id(table: pa.Table) -> dict[int, dict]:
    return {row["movie_id"]: row for row in table.to_pylist()}


def rewrite_catalog(workspace: dict, table: pa.Table) -> None:
    write_catalog(table, workspace["catalog"])


@pytest.mark.slow
def test_each_kind_of_change_rescores_its_movies_and_the_rest_are_carried_over(ray_local, workspace):
    first = night(workspace, "2026-12-01")
    assert first.rows_by_origin == {"scored": MOVIES}
    before = rows_by_id(read_night(workspace["output"]))

    again = night(workspace, "2026-12-02")
    assert again.rows_by_origin == {"carried": MOVIES}  # nothing changed: nothing scored
    assert rows_by_id(read_night(workspace["output"])) == before  # labelled_at and run_id included

    catalog = workspace["table"]
    ids = catalog["movie_id"].to_pylist()
    with_poster = [i for i, uri in zip(ids, catalog["poster_uri"].to_pylist(), strict=True) if uri]
    changed_poster, changed_title, removed = with_poster[0], with_poster[1], with_poster[2]
    poster = Path(catalog["poster_uri"].to_pylist()[ids.index(changed_poster)])
    poster.write_bytes(poster.read_bytes() + b"\0")  # new size and mtime: a new version of the poster
    titles = ["Renamed" if i == changed_title else t for i, t in zip(ids, catalog["title"].to_pylist(), strict=True)]
    catalog = catalog.set_column(catalog.schema.get_field_index("title"), "title", pa.array(titles))
    catalog = catalog.filter(pa.array([i != removed for i in ids]))
    new_movie = catalog.slice(0, 1).to_pylist()[0] | {"movie_id": 10_000, "title": "New Movie"}
    catalog = pa.concat_tables([catalog, pa.Table.from_pylist([new_movie], schema=catalog.schema)])
    rewrite_catalog(workspace, catalog)

    third = night(workspace, "2026-12-03")
    assert third.rows_by_origin == {"scored": 3, "carried": MOVIES - 3}
    assert third.removed == 1
    after = rows_by_id(read_night(workspace["output"]))
    assert set(after) == set(before) - {removed} | {10_000}
    rescored = {i for i, row in after.items() if row["run_id"] == third.run_id}
    assert rescored == {changed_poster, changed_title, 10_000}
    assert after[changed_title]["title"] == "Renamed"
    for movie in set(after) - rescored:
        assert after[movie] == before[movie]  # carried: the old row, its labelled_at and run_id


@pytest.mark.slow
def test_a_new_model_or_new_thresholds_rescore_every_movie_and_full_forces_it(ray_local, workspace):
    night(workspace, "2026-12-01")
    stricter = save_random_model(workspace["root"] / "stricter", image_size=32, thresholds=[0.9] * 18)
    assert night(workspace, "2026-12-02", model=stricter).rows_by_origin == {"scored": MOVIES}
    assert night(workspace, "2026-12-03", model=stricter).rows_by_origin == {"carried": MOVIES}
    assert night(workspace, "2026-12-04", model=stricter, full=True).rows_by_origin == {"scored": MOVIES}


@pytest.mark.slow
def test_each_night_is_one_tagged_snapshot_and_earlier_nights_stay_readable(ray_local, workspace):
    night(workspace, "2026-12-01")
    first = read_night(workspace["output"], "2026-12-01")
    rewrite_catalog(workspace, workspace["table"].slice(0, MOVIES - 2))
    second = night(workspace, "2026-12-02")
    table = labels_table(workspace["output"])
    assert sorted(nights(table)) == ["2026-12-01", "2026-12-02"]
    assert nights(table)["2026-12-02"] == table.current_snapshot().snapshot_id == second.snapshot_id
    summary = table.current_snapshot().summary.additional_properties
    assert summary["genre-pipeline.run-date"] == "2026-12-02"
    assert summary["genre-pipeline.run-id"] == second.run_id
    assert summary["genre-pipeline.model-version"] == second.model_version
    assert (summary["genre-pipeline.rows"], summary["genre-pipeline.rows-carried"],
            summary["genre-pipeline.removed"]) == (str(MOVIES - 2), str(MOVIES - 2), "2")
    assert summary["total-records"] == str(MOVIES - 2)
    assert read_night(workspace["output"], "2026-12-01").equals(first)  # time travel by the night's tag
    assert read_night(workspace["output"]).num_rows == MOVIES - 2


@pytest.mark.slow
def test_a_shrinking_or_empty_catalogue_is_refused_and_commits_nothing(ray_local, workspace):
    night(workspace, "2026-12-01")
    committed = labels_table(workspace["output"]).current_snapshot().snapshot_id
    rewrite_catalog(workspace, workspace["table"].slice(0, 10))
    with pytest.raises(ShrinkingNightError, match="drop 50 of the previous night's 60 movies"):
        night(workspace, "2026-12-02")
    assert labels_table(workspace["output"]).current_snapshot().snapshot_id == committed
    data = Path(workspace["output"]) / "genre_pipeline" / "labels" / "data"
    files_before = sorted(os.listdir(data))
    rewrite_catalog(workspace, workspace["table"].slice(0, 0))
    with pytest.raises(EmptyCatalogError):
        night(workspace, "2026-12-02", allow_shrink=True)
    assert sorted(os.listdir(data)) == files_before  # the refused night's data files were removed
    rewrite_catalog(workspace, workspace["table"].slice(0, 10))
    allowed = night(workspace, "2026-12-02", allow_shrink=True)
    assert (allowed.rows, allowed.removed) == (10, 50)
