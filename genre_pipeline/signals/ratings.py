"""The "ratings" signal: who rated a movie, as a per-movie embedding, by a randomized SVD in streaming Ray Data passes.

Input: Parquet (columns user_id, movie_id, rating, optional timestamp; others ignored) or MovieLens `ratings.dat`
text (`UserID::MovieID::Rating::Timestamp`, optionally `.dat.gz`), a file or a folder, local or s3://, chosen by
suffix. A malformed file fails the run with a `RatingsError` naming the file and the line (text) or column
(Parquet); no row is dropped silently.

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
Movies with fewer than `min_ratings` ratings (none at all included) get no row: "no ratings signal". The result
is a function of the input and the parameters (seed included), up to float rounding: partial sums arrive in any
order (tests compare runs at 1e-6).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray
from ray.data.datasource import FileBasedDatasource

from genre_pipeline.config_fields import AT_LEAST_1, NON_NEGATIVE, check_fields, option
from genre_pipeline.data import storage
from genre_pipeline.errors import JobInputError
from genre_pipeline.signals.embeddings import EmbeddingMeta, write_embeddings

logger = logging.getLogger(__name__)

METHOD = "randomized SVD of the implicit user x movie matrix"
TEXT_SUFFIXES = (".dat", ".dat.gz")
PARQUET_SUFFIX = ".parquet"
DAT_COLUMNS = ["user_id", "movie_id", "rating", "timestamp"]
REQUIRED_COLUMNS = ("user_id", "movie_id", "rating")
WEIGHTINGS = ("binary", "inverse_sqrt")
CHUNK_BYTES = 8 << 20  # text read in chunks of whole lines: a file of any size streams in bounded memory
PARTITION_BYTES = 32 << 20  # input bytes per shuffle partition
BATCH_USERS = 4096  # users per pass batch: each returns one partial (its movies x l), added on the driver


class RatingsError(JobInputError, ValueError):
    """Ratings that cannot be used; the message names the file and the line or column."""


@dataclass(frozen=True)
class RatingsConfig:
    """The ratings embedding job's settings; each field's metadata is its flag in jobs/embed_ratings.py."""

    ratings: str = field(metadata=option(
        "ratings file or folder (local or s3://): *.parquet (user_id, movie_id, rating) or MovieLens *.dat[.gz]"))
    out: str = field(metadata=option("embeddings root; the run goes to <out>/version=<v>/embeddings.parquet"))
    dim: int = field(default=64, metadata=option("embedding dimension (default 64)", check=AT_LEAST_1))
    oversampling: int = field(default=16, metadata=option(
        "extra random directions of the randomized SVD, for accuracy (default 16)", check=NON_NEGATIVE))
    power_iterations: int = field(default=1, metadata=option(
        "power iterations (one more pass over the ratings each; default 1)", check=NON_NEGATIVE))
    min_ratings: int = field(default=1, metadata=option(
        "movies with fewer ratings get no row (default 1)", check=AT_LEAST_1))
    weighting: str = field(default="binary", metadata=option(
        "binary: every rating counts 1; inverse_sqrt: a user's ratings count 1/sqrt(its number of ratings)",
        choices=WEIGHTINGS))
    seed: int = field(default=0, metadata=option("seed of the random projection (default 0)"))
    storage_options: storage.StorageOptions = storage.StorageOptions()

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def params(self) -> dict:
        return {"oversampling": self.oversampling, "power_iterations": self.power_iterations,
                "min_ratings": self.min_ratings, "weighting": self.weighting, "seed": self.seed,
                "scaling": "U*sqrt(s), rows L2-normalised"}


@dataclass(frozen=True)
class RatingsSummary:
    version_uri: str
    rows: int  # movies embedded
    movies: int  # movies with at least one rating
    ratings: int
    users: int
    seconds: float


# ---------------------------------------------------------------- input: listing, fingerprint, reading


def list_inputs(uri: str, options: storage.StorageOptions) -> tuple[str, list[dict]]:
    """(format, files with name/size/mtime-or-ETag) of a file or folder; one format per run."""
    with storage.reporting_errors(uri, "list the ratings"):
        fs, path = storage.fsspec_filesystem(uri, options)
        if fs.isdir(path):
            entries = [entry for entry in fs.find(path, detail=True).values() if entry["type"] == "file"]
        else:
            entries = [fs.info(path)]
    entries = [entry for entry in entries if not entry["name"].rsplit("/", 1)[-1].startswith(("_", "."))]
    formats = {input_format(entry["name"]) for entry in entries}
    if not entries:
        raise RatingsError(f"{uri}: no ratings files")
    if len(formats) != 1 or None in formats:
        names = ", ".join(sorted(entry["name"] for entry in entries)[:5])
        raise RatingsError(f"{uri}: want only *.parquet or only *.dat[.gz] files, found {names}")
    return formats.pop(), sorted(entries, key=lambda entry: entry["name"])


def input_format(name: str) -> str | None:
    if name.endswith(PARQUET_SUFFIX):
        return "parquet"
    return "dat" if name.endswith(TEXT_SUFFIXES) else None


def fingerprint(entries: list[dict], params: dict) -> str:
    """Names, sizes and mtimes (ETags on S3) of the inputs plus the parameters: cheap, no byte is read."""
    files = [[entry["name"], entry.get("size"), file_stamp(entry)]
             for entry in entries]
    return hashlib.sha256(json.dumps({"files": files, "params": params}, sort_keys=True).encode()).hexdigest()[:16]


def file_stamp(entry: dict) -> str:
    return str(entry.get("ETag") or entry.get("mtime") or entry.get("LastModified"))


def full_uri(uri: str, name: str) -> str:
    return f"s3://{name}" if storage.is_remote(uri) else name


class RatingsDatDatasource(FileBasedDatasource):
    """MovieLens `UserID::MovieID::Rating::Timestamp` lines, streamed in chunks (gzip by suffix: Ray opens the
    file decompressing); every line of every chunk is parsed or the read fails naming the file and line."""

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        carry, first_line = b"", 1
        while True:
            chunk = f.read(CHUNK_BYTES)
            data = carry + chunk
            if not chunk:
                if data.strip():
                    yield parse_dat_lines(data, path, first_line)
                return
            end = data.rfind(b"\n") + 1
            carry = data[end:]
            if end:
                yield parse_dat_lines(data[:end], path, first_line)
                first_line += data.count(b"\n", 0, end)


def parse_dat_lines(data: bytes, path: str, first_line: int) -> pa.Table:
    """Fast path: pyarrow's CSV parser on ':'-separated lines (every `::` becomes `:`); on any error, Python finds
    the first bad line so the message can name it."""
    options = pacsv.ConvertOptions(column_types={"user_id": pa.int64(), "movie_id": pa.int64(),
                                                 "rating": pa.float32(), "timestamp": pa.int64()})
    try:
        table = pacsv.read_csv(io.BytesIO(data.replace(b"::", b":")),
                               read_options=pacsv.ReadOptions(column_names=DAT_COLUMNS),
                               parse_options=pacsv.ParseOptions(delimiter=":"), convert_options=options)
    except pa.ArrowInvalid:
        raise first_bad_line(data, path, first_line) from None
    if any(table.column(name).null_count for name in table.column_names):
        raise first_bad_line(data, path, first_line)
    return table


def first_bad_line(data: bytes, path: str, first_line: int) -> RatingsError:
    for number, line in enumerate(data.splitlines(), start=first_line):
        fields = line.split(b"::")
        problem = dat_line_problem(fields)
        if problem:
            return RatingsError(f"{path}: line {number}: {problem}: {line[:200]!r}")
    return RatingsError(f"{path}: lines {first_line}+: cannot parse")


def dat_line_problem(fields: list[bytes]) -> str | None:
    if len(fields) != 4:
        return f"want 4 fields UserID::MovieID::Rating::Timestamp, got {len(fields)}"
    for name, value in zip(("UserID", "MovieID", "Timestamp"), (fields[0], fields[1], fields[3]), strict=True):
        if not value.strip().lstrip(b"-").isdigit():
            return f"field {name} is not an integer"
    try:
        float(fields[2])
    except ValueError:
        return "field Rating is not a number"
    return None


def check_parquet_schemas(uri: str, entries: list[dict], options: storage.StorageOptions) -> None:
    """Each file's footer: the required columns exist, the ids are integers (a float id would be truncated)."""
    fs, _ = storage.arrow_filesystem(uri, options)
    for entry in entries:
        name = full_uri(uri, entry["name"])
        try:
            schema = pq.read_schema(storage.arrow_filesystem(name, options)[1], filesystem=fs)
        except (OSError, pa.ArrowInvalid) as error:
            raise RatingsError(f"{name}: cannot read the Parquet footer: {error}") from None
        missing = [column for column in REQUIRED_COLUMNS if column not in schema.names]
        if missing:
            raise RatingsError(f"{name}: no column {', '.join(missing)} (has {', '.join(schema.names)})")
        for column in ("user_id", "movie_id"):
            if not pa.types.is_integer(schema.field(column).type):
                raise RatingsError(f"{name}: column {column} must be an integer type, is {schema.field(column).type}")


def check_ids(batch: pa.Table) -> pa.Table:
    """No null ids (Parquet); the file is named, the row index of the batch too."""
    for column in ("user_id", "movie_id"):
        values = batch.column(column)
        if values.null_count:
            row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
            path = batch.column("path")[row].as_py()
            raise RatingsError(f"{path}: column {column}: null value ({values.null_count} in a batch)")
    return batch.select(["user_id", "movie_id"]).cast(pa.schema([("user_id", pa.int64()), ("movie_id", pa.int64())]))


def read_ratings(uri: str, file_format: str, entries: list[dict], options: storage.StorageOptions) -> ray.data.Dataset:
    """(user_id, movie_id) int64 rows, lazily streamed from the files."""
    fs, _ = storage.arrow_filesystem(uri, options)
    paths = [storage.arrow_filesystem(full_uri(uri, entry["name"]), options)[1] for entry in entries]
    if file_format == "dat":
        return ray.data.read_datasource(RatingsDatDatasource(paths, filesystem=fs)).select_columns(
            ["user_id", "movie_id"])
    check_parquet_schemas(uri, entries, options)
    context = ray.data.DataContext.get_current()
    default_reader, context.use_datasource_v2 = context.use_datasource_v2, False  # see catalog.catalog_dataset
    try:
        ratings = ray.data.read_parquet(paths, filesystem=fs, columns=list(REQUIRED_COLUMNS), include_paths=True)
    finally:
        context.use_datasource_v2 = default_reader
    return ratings.map_batches(check_ids, batch_format="pyarrow", batch_size=None)


# ---------------------------------------------------------------- the passes


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


def factorise(users: ray.data.Dataset, config: RatingsConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(movie ids, counts, U: movies x l, s: l), largest singular value first."""
    width = config.dim + config.oversampling
    common = {"batch_size": BATCH_USERS, "batch_format": "numpy"}
    movie_ids, counts, y = reduce_movie_sums(users.map_batches(
        sketch_batch, fn_kwargs={"width": width, "seed": config.seed, "weighting": config.weighting}, **common))
    if len(movie_ids) < width:
        raise RatingsError(f"{len(movie_ids)} rated movies: too few for dim + oversampling = {width}")
    for _ in range(config.power_iterations):
        q = np.linalg.qr(y)[0]
        _, _, y = reduce_movie_sums(users.map_batches(project_batch, fn_kwargs={
            "movie_ids": movie_ids, "q": q, "weighting": config.weighting, "power": True}, **common))
    q = np.linalg.qr(y)[0]
    c = np.zeros((width, width))
    for batch in users.map_batches(project_batch, fn_kwargs={
            "movie_ids": movie_ids, "q": q, "weighting": config.weighting, "power": False}, **common).iter_batches(
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


def embed_ratings(config: RatingsConfig) -> RatingsSummary:
    """Read, factorise, write one version under `config.out`."""
    start = time.monotonic()
    file_format, entries = list_inputs(config.ratings, config.storage_options)
    meta_params = {**config.params, "dim": config.dim}
    source_fingerprint = fingerprint(entries, meta_params)
    input_bytes = sum(int(entry.get("size") or 0) for entry in entries)
    users = by_user(read_ratings(config.ratings, file_format, entries, config.storage_options), input_bytes)
    movie_ids, counts, u, s = factorise(users, config)
    keep = counts >= config.min_ratings
    vectors = movie_embedding(u, s, config.dim)[keep]
    meta = EmbeddingMeta(signal="ratings", dim=config.dim, method=METHOD, params=config.params,
                         source=config.ratings, source_fingerprint=source_fingerprint, rows=int(keep.sum()))
    folder = write_embeddings(config.out, movie_ids[keep], vectors, meta, config.storage_options)
    return RatingsSummary(folder, int(keep.sum()), len(movie_ids), int(counts.sum()), users.count(),
                          time.monotonic() - start)
