"""The embedding contract: one versioned Parquet file per embedding run, keyed by `movie_id`.

    <root>/version=<version>/embeddings.parquet
        movie_id int64 (unique, not null), embedding fixed_size_list<float32>[dim]
        schema metadata b"genre_pipeline.embedding": JSON of EmbeddingMeta

The version is a digest of what made the vectors (method, parameters, input fingerprint): the same inputs give
the same version, so a re-run replaces identical data and a model's checkpoint can name exactly the vectors it was
trained with. Readers take a version folder or the file itself.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genre_pipeline.data import storage
from genre_pipeline.errors import JobInputError

META_KEY = b"genre_pipeline.embedding"
FILE_NAME = "embeddings.parquet"
SIGNALS = ("title", "ratings")  # the embedding signals; "poster" is computed from images at scoring time


class EmbeddingError(JobInputError, ValueError):
    """An embedding table that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class EmbeddingMeta:
    signal: str  # one of SIGNALS
    dim: int
    method: str  # e.g. "all-MiniLM-L6-v2 mean pooling" or "randomized SVD of the implicit user x movie matrix"
    params: dict = field(default_factory=dict)
    source: str = ""  # the input's URI
    source_fingerprint: str = ""  # digest of the input (rows, columns or bytes), part of the version
    rows: int = 0
    # Vectors from different runs are comparable when they share a space: a title model maps every title the
    # same way (its space: the model and normalisation), an SVD basis exists only in its own run (empty: the
    # version). A fusion model accepts only tables of the spaces it was trained on.
    space: str = ""

    @property
    def space_id(self) -> str:
        return self.space or self.version

    @property
    def version(self) -> str:
        identity = json.dumps({"signal": self.signal, "dim": self.dim, "method": self.method, "params": self.params,
                               "source_fingerprint": self.source_fingerprint}, sort_keys=True)
        return hashlib.sha256(identity.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "version": self.version}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> EmbeddingMeta:
        values = json.loads(text)
        values.pop("version", None)
        return cls(**values)


def embedding_schema(dim: int, meta: EmbeddingMeta | None = None) -> pa.Schema:
    schema = pa.schema([pa.field("movie_id", pa.int64(), nullable=False),
                        pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False)])
    return schema.with_metadata({META_KEY: meta.to_json()}) if meta else schema


def to_table(movie_ids: np.ndarray, vectors: np.ndarray, meta: EmbeddingMeta) -> pa.Table:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape != (len(movie_ids), meta.dim):
        raise ValueError(f"{vectors.shape} vectors for {len(movie_ids)} movies of dim {meta.dim}")
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), meta.dim)
    return pa.table([pa.array(movie_ids, pa.int64()), embedding], schema=embedding_schema(meta.dim, meta))


def version_uri(root: str, meta: EmbeddingMeta) -> str:
    return storage.join(root, f"version={meta.version}")


def write_embeddings(root: str, movie_ids: np.ndarray, vectors: np.ndarray, meta: EmbeddingMeta,
                     options: storage.StorageOptions = storage.StorageOptions()) -> str:
    """Write one version under `root` (replacing the same version atomically); returns the version folder."""
    if len(np.unique(movie_ids)) != len(movie_ids):
        raise ValueError("duplicate movie_id in the embeddings")
    buffer = io.BytesIO()
    pq.write_table(to_table(movie_ids, vectors, meta), buffer)
    folder = version_uri(root, meta)
    storage.write_atomically(storage.join(folder, FILE_NAME), buffer.getvalue(), options)
    return folder


def file_uri(uri: str) -> str:
    """A version folder or the Parquet file itself -> the file."""
    return uri if uri.endswith(".parquet") else storage.join(uri, FILE_NAME)


def read_meta(uri: str, options: storage.StorageOptions = storage.StorageOptions()) -> EmbeddingMeta:
    path = file_uri(uri)
    fs, local = storage.arrow_filesystem(path, options)
    try:
        schema = pq.read_schema(local, filesystem=fs)
    except (OSError, ValueError) as error:
        raise EmbeddingError(f"{path}: cannot read the embeddings: {error}") from None
    return check_schema(schema, path)


def check_schema(schema: pa.Schema, source: str) -> EmbeddingMeta:
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise EmbeddingError(f"{source}: no {META_KEY.decode()} metadata: not written by an embedding job")
    meta = EmbeddingMeta.from_json(raw)
    if "movie_id" not in schema.names or schema.field("movie_id").type != pa.int64():
        raise EmbeddingError(f"{source}: column movie_id must be int64")
    expected = pa.list_(pa.float32(), meta.dim)
    if "embedding" not in schema.names or schema.field("embedding").type != expected:
        raise EmbeddingError(f"{source}: column embedding must be {expected}")
    return meta


def read_embeddings(uri: str, options: storage.StorageOptions = storage.StorageOptions(),
                    ) -> tuple[np.ndarray, np.ndarray, EmbeddingMeta]:
    """(movie_ids, vectors rows x dim float32, meta) of one version."""
    path = file_uri(uri)
    meta = read_meta(path, options)
    fs, local = storage.arrow_filesystem(path, options)
    table = pq.read_table(local, filesystem=fs)
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, meta.dim)
    return table.column("movie_id").to_numpy(), vectors.astype(np.float32, copy=False), meta
