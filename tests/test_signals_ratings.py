"""The ratings embedding (genre_pipeline/signals/ratings.py, jobs/embed_ratings.py) on small generated ratings."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import load_job

from genre_pipeline.signals.embeddings import read_embeddings
from genre_pipeline.signals.ratings import RatingsConfig, embed_ratings
from genre_pipeline.signals.ratings_files import RatingsError, parse_dat_lines
from genre_pipeline.signals.ratings_svd import gaussian_rows


def two_communities(seed: int = 0) -> np.ndarray:
    """(user, movie) pairs: users 1-60 rate only movies 1-20, users 61-120 only movies 101-120, at random."""
    rng = np.random.default_rng(seed)
    pairs = []
    for users, movies in ((range(1, 61), np.arange(1, 21)), (range(61, 121), np.arange(101, 121))):
        for user in users:
            pairs += [(user, movie) for movie in rng.choice(movies, size=8, replace=False)]
    return np.array(pairs)


def write_dat(path: Path, pairs: np.ndarray) -> Path:
    text = "".join(f"{user}::{movie}::4::97830{index}\n" for index, (user, movie) in enumerate(pairs))
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def write_parquet(path: Path, pairs: np.ndarray) -> Path:
    pq.write_table(pa.table({"user_id": pairs[:, 0], "movie_id": pairs[:, 1], "rating": np.full(len(pairs), 4.0),
                             "extra": ["x"] * len(pairs)}), path)
    return path


def embed(ratings: Path, out: Path, **params) -> tuple[np.ndarray, np.ndarray]:
    summary = embed_ratings(RatingsConfig(ratings=str(ratings), out=str(out), **params))
    ids, vectors, _ = read_embeddings(summary.version_uri)
    return ids, vectors


def test_hashed_gaussian_rows_are_deterministic_standard_normals():
    users = np.arange(1, 20001)
    rows = gaussian_rows(users, 8, seed=3)
    assert np.array_equal(rows, gaussian_rows(users, 8, seed=3))
    assert np.array_equal(rows[5:7], gaussian_rows(users[5:7], 8, seed=3))  # a row depends on its user alone
    assert not np.allclose(rows, gaussian_rows(users, 8, seed=4))
    assert abs(rows.mean()) < 0.02 and abs(rows.std() - 1) < 0.02


def test_a_malformed_line_is_named_with_its_file_and_line_number():
    parse_dat_lines(b"1::2::3.5::4\n", "r.dat", 1)
    with pytest.raises(RatingsError, match=r"r\.dat: line 11: field MovieID is not an integer"):
        parse_dat_lines(b"1::2::3::4\n1::x::3::4\n", "r.dat", 10)
    with pytest.raises(RatingsError, match=r"r\.dat: line 2: want 4 fields"):
        parse_dat_lines(b"1::2::3::4\n1::2::3\n", "r.dat", 1)


def test_the_embedding_separates_who_rated_what_and_movies_without_ratings_have_no_row(ray_local, tmp_path):
    ids, vectors = embed(write_dat(tmp_path / "ratings.dat", two_communities()), tmp_path / "out", dim=2,
                         oversampling=4)
    assert set(ids) == set(range(1, 21)) | set(range(101, 121))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    similarity = vectors @ vectors.T
    same = (ids[:, None] < 100) == (ids[None, :] < 100)
    assert similarity[same].mean() > 0.9 and abs(similarity[~same].mean()) < 0.1


def test_the_formats_give_the_same_embedding(ray_local, tmp_path):
    pairs = two_communities(seed=1)
    inputs = [write_dat(tmp_path / "r.dat", pairs), write_dat(tmp_path / "r.dat.gz", pairs),
              write_parquet(tmp_path / "r.parquet", pairs)]
    (ids, vectors), *others = [embed(path, tmp_path / path.name.replace(".", "_"), dim=4, oversampling=4)
                               for path in inputs]
    for other_ids, other_vectors in others:
        assert np.array_equal(ids, other_ids) and np.allclose(vectors, other_vectors, atol=1e-5)


def test_it_finds_the_exact_svd_subspace(ray_local, tmp_path):
    """A low-rank-plus-noise 0/1 matrix: the embedding's span is the top singular subspace of numpy's SVD."""
    rng = np.random.default_rng(2)
    users, movies, dim = 300, 80, 6
    scores = rng.normal(size=(movies, dim)) * np.linspace(3, 1.5, dim) @ rng.normal(size=(dim, users))
    dense = (scores + rng.normal(size=scores.shape) * 0.5 > 1).astype(float)
    movie_index, user_index = np.nonzero(dense)
    ids, vectors = embed(write_parquet(tmp_path / "r.parquet", np.stack([user_index + 1, movie_index + 1], 1)),
                         tmp_path / "out", dim=dim, oversampling=10, power_iterations=2)
    exact = np.linalg.svd(dense[ids - 1], full_matrices=False)[0][:, :dim]
    found = np.linalg.qr(vectors)[0]
    # cosines of the principal angles between the two subspaces
    assert np.linalg.svd(exact.T @ found, compute_uv=False).min() > 0.98


def test_the_job_writes_a_version_reads_back_and_is_deterministic(ray_local, tmp_path, capsys):
    job = load_job("embed_ratings")
    pairs = two_communities(seed=3)
    ratings = write_dat(tmp_path / "ratings.dat", np.concatenate([pairs, [[500, 900]]]))  # movie 900: 1 rating
    argv = ["--ratings", str(ratings), "--out", str(tmp_path / "emb"), "--dim", "4", "--oversampling", "4",
            "--min-ratings", "2", "--seed", "5"]
    assert job.main(argv) == 0
    folder = capsys.readouterr().out.split("output: ")[1].strip()
    ids, vectors, meta = read_embeddings(folder)
    assert 900 not in ids and len(ids) == 40 and vectors.shape == (40, 4)
    assert (meta.signal, meta.dim, meta.rows, meta.params["seed"]) == ("ratings", 4, 40, 5)
    assert job.main(argv) == 0
    again = capsys.readouterr().out.split("output: ")[1].strip()
    assert again == folder and np.allclose(read_embeddings(again)[1], vectors, atol=1e-6)


def test_bad_ratings_exit_2_naming_the_file_and_the_line_or_column(ray_local, tmp_path, caplog):
    job = load_job("embed_ratings")
    bad = tmp_path / "bad.dat.gz"
    bad.write_bytes(gzip.compress(b"1::2::3::4\n1::3::3::4\n7::oops::3::4\n"))
    assert job.main(["--ratings", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.dat.gz: line 3: field MovieID is not an integer" in caplog.text
    pq.write_table(pa.table({"user_id": [1], "rating": [3.0]}), tmp_path / "nomovie.parquet")
    assert job.main(["--ratings", str(tmp_path / "nomovie.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert "nomovie.parquet: no column movie_id" in caplog.text
