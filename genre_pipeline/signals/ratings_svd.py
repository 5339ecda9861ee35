"""The "ratings" signal's maths: a per-movie embedding of who rated each movie, by a randomized SVD in streaming
Ray Data passes over the (user_id, movie_id) rows ratings_files.py reads.

The matrix X (movies x users) is implicit feedback: X[m, u] = w_u when user u rated m (the rating's value is not
used: *that* someone chose to rate a movie is the genre signal; a duplicate rating counts once). w_u is 1 (the
default: it did no worse, docs/performance.md), or 1/sqrt(n_u) with `weighting="inverse_sqrt"`.

Randomized truncated SVD (Halko, Martinsson & Tropp 2011), l = dim + oversampling:
  0. one Ray Data `groupby("user_id").map_groups(...)` turns the ratings into one row per user holding its movie ids
     (materialised once in the object store, spread over the cluster; never on the driver). Every later pass is a
     plain streaming `map_batches` over whole users: vectorised numpy per batch instead of a Python call per user.
  1. Y = X Omega: Omega[u] is a Gaussian row drawn from a hash of (seed, user_id), so no user index exists anywhere;
     each batch returns its per-movie partial sums, which the driver adds (movies x l floats is small).
  2. q power iterations (default 1, which sharpens the genre signal most: docs/performance.md): Z = X^T Q per
     user, Y = X Z per movie, re-orthonormalised each time.
  3. Q = qr(Y); one more pass computes z_u = w_u * sum of Q over u's movies (the column u of B = Q^T X) and
     C = sum_u z_u z_u^T (l x l) per batch; eig(C) = V diag(s^2) V^T gives the movie factors U = Q V and the singular
     values s. The embedding is the top `dim` columns of U * sqrt(s), each row L2-normalised: the scaling a genre
     classifier did best on (docs/performance.md).
The result is a function of the input and the parameters (seed included), up to float rounding: partial sums
arrive in any order.
"""

from __future__ import annotations

import numpy as np
import ray

from genre_pipeline.signals.ratings_files import RatingsError

WEIGHTINGS = ("binary", "inverse_sqrt")
PARTITION_BYTES = 32 << 20  # input bytes per shuffle partition
# Users (rows of the per-user dataset) per block of each pass: each returns one partial (its movies x l), added on
# the driver.
PASS_BLOCK_ROWS = 4096


def user_movies(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One user's ratings -> one row: its id and its distinct movies (a duplicate rating counts once)."""
    movies = np.unique(group["movie_id"])
    return {"user_id": group["user_id"][:1], "movies": np.array([movies], dtype=object), "n": np.array([len(movies)])}


def by_user(ratings: ray.data.Dataset, input_bytes: int) -> ray.data.Dataset:
    """One row per user with its movies, materialised (distributed) once: every pass re-reads it, not the files."""
    # One shuffle partition per core of the cluster, more for large inputs; Ray's default of 200 costs a small
    # input more in scheduling than in work.
    partitions = max(int(ray.cluster_resources().get("CPU", 1)), input_bytes // PARTITION_BYTES)
    return ratings.groupby("user_id", num_partitions=partitions).map_groups(
        user_movies, batch_format="numpy").materialize()


def gaussian_rows(user_ids: np.ndarray, width: int, seed: int) -> np.ndarray:
    """Omega[u]: `width` standard normals from splitmix64 of (seed, user_id, column), identical on any worker."""
    offset = np.array([seed], dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # an array: wraps without a warning
    counters = (user_ids.astype(np.uint64)[:, None] * np.uint64(2 * width + 1)
                + np.arange(2 * width, dtype=np.uint64)[None, :] + offset)
    bits = splitmix64(counters)
    uniform = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)  # in (0, 1), never 0
    radius = np.sqrt(-2.0 * np.log(uniform[:, :width]))
    return radius * np.cos(2.0 * np.pi * uniform[:, width:])  # Box-Muller


def splitmix64(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def user_weights(counts: np.ndarray, weighting: str) -> np.ndarray:
    return np.ones(len(counts)) if weighting == "binary" else 1.0 / np.sqrt(counts)


def flat_movies(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(every rated movie of the batch, the batch row of its user)."""
    lengths = np.array([len(movies) for movies in batch["movies"]])
    return np.concatenate(list(batch["movies"])).astype(np.int64), np.repeat(np.arange(len(lengths)), lengths)


def movie_sums(movies: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Partial per-movie sums of `rows` (one row per rating), plus each movie's number of ratings."""
    ids, index, counts = np.unique(movies, return_inverse=True, return_counts=True)
    sums = np.zeros((len(ids), rows.shape[1]))
    np.add.at(sums, index, rows)
    return {"movie_id": ids, "count": counts, "y": sums}


def sketch_batch(batch: dict[str, np.ndarray], width: int, seed: int, weighting: str) -> dict[str, np.ndarray]:
    """Pass 1's partial Y = X Omega for a batch of users."""
    movies, owner = flat_movies(batch)
    omega = gaussian_rows(batch["user_id"], width, seed) * user_weights(batch["n"], weighting)[:, None]
    return movie_sums(movies, omega[owner])


def project_batch(batch: dict[str, np.ndarray], movie_ids: np.ndarray, q: np.ndarray, weighting: str,
                  power: bool) -> dict[str, np.ndarray]:
    """z_u = w_u * sum of Q over u's movies; returns the partial C = sum z z^T, or with `power` the partial
    Y = X Z per movie."""
    movies, owner = flat_movies(batch)
    weights = user_weights(batch["n"], weighting)
    z = np.zeros((len(batch["n"]), q.shape[1]))
    np.add.at(z, owner, q[np.searchsorted(movie_ids, movies)])
    z *= weights[:, None]
    if power:
        return movie_sums(movies, z[owner] * weights[owner, None])
    return {"c": (z.T @ z)[None]}


def reduce_movie_sums(partials: ray.data.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add the partial per-movie sums on the driver, in movie-id order: (movie ids, counts, Y)."""
    ids, counts, sums = [], [], []
    for batch in partials.iter_batches(batch_size=None, batch_format="numpy"):
        ids.append(batch["movie_id"])
        counts.append(batch["count"])
        sums.append(batch["y"])
    if not ids:
        raise RatingsError("no ratings")
    all_ids = np.concatenate(ids)
    order = np.argsort(all_ids, kind="stable")  # a fixed order of addition: the same bits on every run
    movie_ids, starts = np.unique(all_ids[order], return_index=True)
    y = np.add.reduceat(np.concatenate(sums)[order], starts, axis=0)
    return movie_ids, np.add.reduceat(np.concatenate(counts)[order], starts), y


def factorise(users: ray.data.Dataset, *, dim: int, oversampling: int, power_iterations: int, seed: int,
              weighting: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(movie ids, counts, U: movies x l, s: l) with l = dim + oversampling, largest singular value first."""
    width = dim + oversampling
    common = {"batch_size": PASS_BLOCK_ROWS, "batch_format": "numpy"}
    movie_ids, counts, y = reduce_movie_sums(users.map_batches(
        sketch_batch, fn_kwargs={"width": width, "seed": seed, "weighting": weighting}, **common))
    if len(movie_ids) < width:
        raise RatingsError(f"{len(movie_ids)} rated movies: too few for dim + oversampling = {width}")
    for _ in range(power_iterations):
        q = np.linalg.qr(y)[0]
        _, _, y = reduce_movie_sums(users.map_batches(project_batch, fn_kwargs={
            "movie_ids": movie_ids, "q": q, "weighting": weighting, "power": True}, **common))
    q = np.linalg.qr(y)[0]
    c = np.zeros((width, width))
    for batch in users.map_batches(project_batch, fn_kwargs={
            "movie_ids": movie_ids, "q": q, "weighting": weighting, "power": False}, **common).iter_batches(
            batch_size=None, batch_format="numpy"):
        c += batch["c"].sum(axis=0)
    eigenvalues, vectors = np.linalg.eigh(c)
    order = np.argsort(eigenvalues)[::-1]
    return movie_ids, counts, q @ vectors[:, order], np.sqrt(np.clip(eigenvalues[order], 0, None))


def movie_embedding(u: np.ndarray, s: np.ndarray, dim: int) -> np.ndarray:
    """U * sqrt(s) over the top `dim`, rows L2-normalised; a sign convention makes it reproducible."""
    u = u[:, :dim] * np.where(u[:, :dim].sum(axis=0) < 0, -1.0, 1.0)  # eigenvectors' sign is arbitrary
    vectors = u * np.sqrt(s[:dim])
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)
