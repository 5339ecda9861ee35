"""The fusion model end to end on generated data: embedding tables whose vectors carry each movie's genres (with
noise), some movies without a poster, a title or ratings; trained with Ray Train, then the label job scores every
movie with the signals it has, and the evaluation report shows the per-subset table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_job, read_night

from genre_pipeline.data.catalog import is_validation, read_catalog, write_catalog
from genre_pipeline.data.images import PreprocessSpec
from genre_pipeline.data.sample import build_sample_catalog
from genre_pipeline.genres import GENRES, encode_many
from genre_pipeline.label.night import label_catalog
from genre_pipeline.label.pipeline import LabelConfig, SignalTablesError
from genre_pipeline.model.architectures import build_model
from genre_pipeline.model.checkpoints import ModelMeta, read_meta, save_checkpoint
from genre_pipeline.model.fusion import FusionHead, FusionNet, FusionSpec, fusion_inputs
from genre_pipeline.model.predictor import FusionPredictor, load_predictor
from genre_pipeline.model.signals import all_subsets, subset_name
from genre_pipeline.signals.embeddings import EmbeddingMeta, read_embeddings, write_embeddings
from genre_pipeline.signals.join import signal_matrix
from genre_pipeline.statuses import STATUS_MISSING, STATUS_OK, STATUS_PARTIAL, STATUS_UNREADABLE
from genre_pipeline.train.fusion_loop import FusionLoopConfig, dropped_signals, signal_rows

MOVIES = 240
DIMS = {"title": 12, "ratings": 8}
NOISE = {"title": 2.0, "ratings": 0.5}  # ratings the stronger signal, as on MovieLens
COVERAGE = {"title": 0.9, "ratings": 0.8}
RUN_DATE = "2026-12-01"


def genre_embeddings(ids: np.ndarray, targets: np.ndarray, signal: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy linear image of each movie's genres, for a random `COVERAGE` share of the movies."""
    rng = np.random.default_rng(seed)
    vectors = targets @ rng.normal(size=(targets.shape[1], DIMS[signal]))
    vectors += NOISE[signal] * rng.normal(size=vectors.shape)
    keep = rng.random(len(ids)) < COVERAGE[signal]
    return ids[keep], vectors[keep]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fusion")
    table = build_sample_catalog(str(root), MOVIES, seed=11, poster_size=(48, 72))
    write_catalog(table, str(root / "catalog.parquet"))
    ids, targets = table["movie_id"].to_numpy(), encode_many(table["genres"].to_pylist(), GENRES)
    tables = {}
    for seed, signal in enumerate(DIMS):
        kept_ids, vectors = genre_embeddings(ids, targets, signal, seed)
        meta = EmbeddingMeta(signal=signal, dim=DIMS[signal], method="generated", params={"seed": seed},
                             source_fingerprint=f"test-{signal}", rows=len(kept_ids))
        tables[signal] = write_embeddings(str(root / "embeddings" / signal), kept_ids, vectors, meta)
    return {"root": root, "catalog": str(root / "catalog.parquet"), "tables": tables, "table": table}


@pytest.fixture(scope="module")
def fusion_model(ray_local, world) -> str:
    job = load_job("train_fusion_model")
    code = job.main(["--catalog", world["catalog"], "--storage-path", str(world["root"] / "runs"), "--name", "f",
                     "--title-embeddings", world["tables"]["title"], "--ratings-embeddings",
                     world["tables"]["ratings"], "--image-size", "32", "--epochs", "80", "--patience", "20",
                     "--num-workers", "2", "--cpus-per-worker", "0.5", "--val-fraction", "0.25"])
    assert code == 0
    return str(world["root"] / "runs" / "f" / "model")


def test_modality_dropout_hides_signals_but_never_all_of_a_row():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]).repeat(500, 1)
    kept = dropped_signals(mask, 0.5, torch.Generator().manual_seed(0))
    assert torch.all(kept <= mask), "a missing signal was made present"
    assert torch.all(kept.sum(dim=1) >= 1), "a row lost every signal"
    assert torch.equal(kept[1::3], mask[1::3]), "a row's only signal was dropped"
    hidden = 1 - kept[0::3].mean().item()
    assert 0.3 < hidden < 0.5, hidden  # 0.5 per signal, less the rows that would have lost all three


def test_a_missing_signal_contributes_its_learned_absent_vector_whatever_its_values():
    torch.manual_seed(0)
    head = FusionHead({"title": 4, "ratings": 3}, hidden=8, num_genres=5).eval()
    mask = torch.tensor([[1.0, 0.0]])
    title = torch.randn(1, 4)
    with torch.no_grad():
        one = head({"title": title, "ratings": torch.randn(1, 3)}, mask)
        other = head({"title": title, "ratings": torch.full((1, 3), float("nan"))}, mask)
        both = head({"title": title, "ratings": torch.randn(1, 3)}, torch.ones(1, 2))
    assert torch.equal(one, other)
    assert not torch.allclose(one, both)


def test_subsets_are_named_in_one_order():
    assert subset_name(["ratings", "poster"]) == "poster+ratings"
    assert [subset_name(s) for s in all_subsets(["title", "poster", "ratings"])] == [
        "poster", "title", "ratings", "poster+title", "poster+ratings", "title+ratings", "poster+title+ratings"]


def test_joined_columns_become_a_matrix_and_a_presence_mask():
    column = np.empty(3, dtype=object)
    column[:] = [np.array([1.0, 2.0]), None, np.array([3.0, 4.0])]
    matrix, present = signal_matrix(column, 3, 2)
    assert present.tolist() == [True, False, True]
    assert matrix.tolist() == [[1.0, 2.0], [0.0, 0.0], [3.0, 4.0]]
    nan_rows = np.array([[1.0, 2.0], [np.nan, np.nan]], dtype=np.float32)
    matrix, present = signal_matrix(nan_rows, 2, 2)
    assert present.tolist() == [True, False] and matrix[1].tolist() == [0.0, 0.0]


def mixed_batch(rows: int = 6) -> dict[str, np.ndarray]:
    """Decoded posters for some rows, title vectors (some missing), ratings vectors (some missing)."""
    rng = np.random.default_rng(3)
    statuses = np.array([STATUS_OK, STATUS_MISSING, STATUS_OK, STATUS_UNREADABLE, STATUS_OK, STATUS_MISSING][:rows],
                        dtype=object)
    title = np.empty(rows, dtype=object)
    title[:] = [rng.normal(size=DIMS["title"]).astype(np.float32) if i % 3 else None for i in range(rows)]
    ratings = rng.normal(size=(rows, DIMS["ratings"])).astype(np.float32)
    ratings[1::2] = np.nan  # no row in the ratings table
    return {"movie_id": np.arange(rows), "status": statuses, "error": np.full(rows, None, dtype=object),
            "image": rng.integers(0, 256, (rows, 24, 16, 3), dtype=np.uint8), "title_embedding": title,
            "ratings_embedding": ratings, "target": np.eye(rows, len(GENRES), dtype=np.float32)}


def test_training_and_serving_get_the_same_fused_inputs_for_the_same_rows(tmp_path):
    """One function decides which signals a row has (`fusion_inputs`): the training rows the fusion head learns
    from and the rows the label job scores carry the same mask and embeddings, and score the same."""
    torch.manual_seed(0)
    backbone = build_model(arch="efficientnet_lite0", num_genres=len(GENRES), pooled_blocks=()).backbone.eval()
    signals, dims = ("poster", "title", "ratings"), {"poster": backbone.feature_width, **DIMS}
    spec = PreprocessSpec(image_size=16, image_height=24)
    config = FusionLoopConfig(arch="efficientnet_lite0", genres=list(GENRES), preprocess=spec, signals=signals,
                              dims=dims, embeddings={}, batch_size=4)
    batch = mixed_batch()
    trained = signal_rows(dict(batch), backbone, config, views=1)
    served = fusion_inputs(dict(batch), list(signals), dims)
    np.testing.assert_array_equal(trained.mask, served.mask)
    assert trained.mask.tolist() == [[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]]
    for signal in DIMS:
        np.testing.assert_array_equal(trained.embeddings[signal], served.embeddings[signal])

    head = FusionHead(dims, 8, len(GENRES)).eval()
    meta = ModelMeta(arch="efficientnet_lite0", genres=list(GENRES), preprocess=spec, thresholds=[0.5] * len(GENRES),
                     signals=list(signals), pooled_blocks=[],
                     fusion=FusionSpec(hidden=8, dims=dims).to_dict())
    model = FusionNet(backbone, head)
    save_checkpoint(tmp_path / "fusion", model, meta)
    predictor = load_predictor(str(tmp_path / "fusion"), device="cpu", num_threads=1)
    assert isinstance(predictor, FusionPredictor)
    scored = predictor(dict(batch))
    assert [list(row) for row in scored["signals"]] == served.used()
    assert np.isnan(scored["scores"][3]).all() and scored["status"][3] == STATUS_UNREADABLE
    with torch.inference_mode():
        inputs = {s: torch.from_numpy(e) for s, e in trained.embeddings.items()}
        inputs["poster"] = torch.from_numpy(trained.poster[:, 0])
        expected = torch.sigmoid(head(inputs, torch.from_numpy(trained.mask))).numpy()
    present = trained.mask.any(axis=1)
    np.testing.assert_allclose(scored["scores"][present], expected[present], atol=1e-4)


def test_the_fusion_spec_reads_and_writes_the_meta_object_of_older_checkpoints():
    stored = {"hidden": 8, "dims": {"title": 12}, "embeddings": {"title": {"version": "v1", "uri": "u"}},
              "thresholds_by_signals": {"title": [0.5]}, "subset_metrics": {"title": {"map_at_3": 0.5}},
              "validation_rows": 3}
    spec = FusionSpec.from_dict(stored)
    assert spec.to_dict() == stored and spec.table_versions() == {"title": "v1"}
    assert FusionSpec.from_dict({}) is None
    meta = ModelMeta(arch="efficientnet_lite0", genres=["Drama"], preprocess=PreprocessSpec(image_size=16),
                     thresholds=[0.3], signals=["title"], fusion=stored)
    again = ModelMeta.from_json(meta.to_json())
    assert again == meta and again.fusion_spec == spec and again.thresholds_for("title").tolist() == [0.5]


def test_the_checkpoint_records_its_signals_tables_and_every_subset_beats_the_prior(fusion_model, world):
    meta = read_meta(fusion_model)
    assert meta.signals == ["poster", "title", "ratings"]
    assert meta.model_version.startswith("fusion-efficientnet_lite0-")
    for signal, uri in world["tables"].items():
        recorded = meta.fusion["embeddings"][signal]
        assert recorded["version"] == read_embeddings(uri)[2].version and recorded["dim"] == DIMS[signal]
    subsets = meta.fusion["subset_metrics"]
    expected = {subset_name(s) for s in all_subsets(meta.signals)}
    assert set(subsets) == expected | {"frequency prior"}
    assert set(meta.fusion["thresholds_by_signals"]) == expected
    prior = subsets["frequency prior"]
    for name in expected:
        assert subsets[name]["map_at_1"] > prior["map_at_1"], name
    assert subsets["poster+title+ratings"]["map_at_1"] >= subsets["title"]["map_at_1"]


def label(world: dict, model: str, output: Path, **extra) -> dict[int, dict]:
    label_catalog(LabelConfig(catalog=world["catalog"], model=model, output=str(output), run_date=RUN_DATE,
                              **extra))
    rows = read_night(output, RUN_DATE).to_pylist()
    return {row["movie_id"]: row for row in rows}


def test_the_label_job_scores_each_movie_with_the_signals_it_has(fusion_model, world, tmp_path):
    rows = label(world, fusion_model, tmp_path / "labels")
    catalog = read_catalog(world["catalog"]).to_pylist()
    has = {signal: set(read_embeddings(uri)[0].tolist()) for signal, uri in world["tables"].items()}
    assert len(rows) == len(catalog)
    for movie in catalog:
        row = rows[movie["movie_id"]]
        expected = ([] if movie["poster_uri"] is None else ["poster"]) + [
            s for s in ("title", "ratings") if movie["movie_id"] in has[s]]
        assert row["signals"] == expected, movie["movie_id"]
        if len(expected) == 3:
            assert row["status"] == STATUS_OK and row["error"] is None
        elif expected:
            assert row["status"] == STATUS_PARTIAL and row["genres"] is not None and row["score_drama"] is not None
            assert ("poster missing_poster" in row["error"]) == (movie["poster_uri"] is None)
        else:
            assert row["status"] == STATUS_MISSING and row["genres"] is None
    no_poster = [r for r in rows.values() if r["poster_uri"] is None and r["signals"]]
    assert no_poster, "the sample has movies without a poster but with other signals"


def test_each_row_gets_the_thresholds_of_its_signals(fusion_model, world, tmp_path):
    meta = read_meta(fusion_model)
    rows = label(world, fusion_model, tmp_path / "labels")
    for row in rows.values():
        if not row["signals"]:
            continue
        thresholds = meta.thresholds_for("+".join(row["signals"]))
        scores = np.array([row[f"score_{g.lower().replace('-', '_').replace(chr(39), '')}"] for g in GENRES])
        assert row["genres"] == [g for g, s, t in zip(GENRES, scores, thresholds, strict=True) if s >= t]


def test_a_table_from_another_space_or_signal_is_refused(fusion_model, world, tmp_path):
    ids, vectors, meta = read_embeddings(world["tables"]["ratings"])
    rerun = EmbeddingMeta(**{**meta.__dict__, "source_fingerprint": "another-ratings-run"})
    other = write_embeddings(str(tmp_path / "ratings"), ids, vectors, rerun)
    with pytest.raises(SignalTablesError, match="retrain the fusion model"):
        label(world, fusion_model, tmp_path / "labels", ratings_embeddings=other)
    with pytest.raises(Exception, match="holds 'ratings' embeddings, given as 'title'"):
        label(world, fusion_model, tmp_path / "labels", title_embeddings=world["tables"]["ratings"])
    assert not (tmp_path / "labels").exists() or not list((tmp_path / "labels").rglob("*.parquet"))


def test_a_poster_model_refuses_embedding_tables(ray_local, world, tmp_path):
    from conftest import save_random_model

    model = save_random_model(tmp_path / "poster-model")
    with pytest.raises(SignalTablesError, match="does not use title embeddings"):
        label(world, model, tmp_path / "labels", title_embeddings=world["tables"]["title"])


def test_evaluate_reports_the_per_subset_table(fusion_model, world, tmp_path):
    label(world, fusion_model, tmp_path / "labels")
    job = load_job("evaluate")
    code = job.main(["--labels", str(tmp_path / "labels"), "--catalog", world["catalog"], "--split", "validation",
                     "--val-fraction", "0.25", "--model", fusion_model, "--out", str(tmp_path / "eval")])
    assert code == 0
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "- signals: poster, title, ratings" in report
    for name in ("| poster+title |", "| title+ratings |", "| poster+title+ratings |", "| frequency prior |"):
        assert name in report, name
    groups = json.loads((tmp_path / "eval" / "report.json").read_text())["by_signals"]
    rows = label(world, fusion_model, tmp_path / "again")
    catalog = read_catalog(world["catalog"]).to_pylist()
    validation = {m["movie_id"] for m in catalog if is_validation(m["movie_id"], 0.25) and m["split"] == "train"}
    expected: dict[str, int] = {}
    for movie_id in validation:
        if rows[movie_id]["signals"] and rows[movie_id]["genres"] is not None:
            name = "+".join(rows[movie_id]["signals"])
            expected[name] = expected.get(name, 0) + 1
    assert {name: group["rows"] for name, group in groups.items()} == expected
    assert "## By the signals that scored each movie" in report
