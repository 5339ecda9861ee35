"""Training rows, for both recipes: which catalogue rows train, the stable validation split, their targets (one
encoding: a fixed-size multi-hot `target` column) and the poster model's Ray Data pipeline."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from genre_pipeline.data import storage
from genre_pipeline.data.catalog import CatalogError, is_validation, read_catalog
from genre_pipeline.data.images import Size
from genre_pipeline.data.posters import decode_posters, fetch_posters
from genre_pipeline.genres import encode_many
from genre_pipeline.statuses import STATUS_OK
from genre_pipeline.train.augmentation import augment_batch, training_augmentation

TRAIN_COLUMNS = ["movie_id", "genres", "poster_uri"]
# Rows per Ray Data block: several blocks per epoch so decoding runs in parallel tasks and streams.
ROWS_PER_BLOCK = 128
# Positive-class weights are capped: a genre with 3 examples must not dominate the loss.
MAX_POS_WEIGHT = 10.0


def load_training_rows(catalog_uri: str, options: storage.StorageOptions, *, needs_poster: bool = True) -> pa.Table:
    """Rows of the train split with at least one genre and, when `needs_poster` (the poster model), a poster."""
    table = read_catalog(catalog_uri, options)
    if "split" not in table.column_names or "genres" not in table.column_names:
        raise CatalogError(f"{catalog_uri}: training needs the columns 'split' and 'genres'")
    keep = pc.equal(table["split"], "train")
    if needs_poster:
        keep = pc.and_(keep, pc.is_valid(table["poster_uri"]))
    keep = pc.and_(keep, pc.greater(pc.fill_null(pc.list_value_length(table["genres"]), 0), 0))
    rows = table.filter(keep).select(TRAIN_COLUMNS)
    if rows.num_rows == 0:
        wanted = "a poster_uri and genres" if needs_poster else "and genres"
        raise CatalogError(f"{catalog_uri}: no rows with split == 'train'{',' if needs_poster else ''} {wanted}")
    return rows


def split_rows(rows: pa.Table, val_fraction: float) -> tuple[pa.Table, pa.Table]:
    mask = pa.array([is_validation(i, val_fraction) for i in rows["movie_id"].to_pylist()])
    return rows.filter(pc.invert(mask)), rows.filter(mask)


def fingerprint(train: pa.Table, val: pa.Table) -> str:
    """Which rows trained and validated the model, recorded in its checkpoint."""
    digest = hashlib.sha256()
    for table in (train, val):
        digest.update(np.sort(table["movie_id"].to_numpy()).tobytes())
    return digest.hexdigest()[:16]


def positive_weights(train: pa.Table, genres: Sequence[str]) -> list[float]:
    """sqrt(negatives / positives) per genre: lifts rare genres without the noise of the full ratio."""
    targets = encode_many(train["genres"].to_pylist(), genres)
    positives = targets.sum(axis=0)
    negatives = len(targets) - positives
    weights = np.sqrt(negatives / np.maximum(positives, 1))
    return np.clip(weights, 1.0, MAX_POS_WEIGHT).round(4).tolist()


def with_targets(rows: pa.Table, genres: Sequence[str]) -> pa.Table:
    """`rows` with their genres as the multi-hot `target` column (float32, one per genre) in place of `genres`: the
    one form targets travel in through Ray Data (ragged string lists would not turn back into Arrow)."""
    targets = encode_many(rows["genres"].to_pylist(), genres)
    column = pa.FixedSizeListArray.from_arrays(pa.array(targets.reshape(-1), pa.float32()), len(genres))
    return rows.drop_columns(["genres"]).append_column("target", column)


def batch_targets(batch: dict[str, np.ndarray]) -> np.ndarray:
    """A batch's `target` column as (rows, genres) float32."""
    targets = np.asarray(batch["target"], np.float32)
    return targets if targets.ndim == 2 else targets.reshape(len(targets), -1)


def prepare_training_batch(batch: dict[str, np.ndarray], *, image_size: Size, augment: bool) -> dict[str, np.ndarray]:
    """Decoded (and, for training, augmented) images with their targets; unreadable posters are dropped."""
    batch = decode_posters(batch, image_size=image_size)
    ok = batch["status"] == STATUS_OK
    images = batch["image"][ok]
    if augment and len(images):
        images = augment_batch(images, training_augmentation(image_size))
    return {"image": images, "target": batch_targets(batch)[ok]}


def to_dataset(rows: pa.Table, *, genres: Sequence[str], image_size: Size, augment: bool,
               options: storage.StorageOptions) -> ray.data.Dataset:
    """Lazy pipeline, re-run every epoch: fresh augmentations, and memory bounded by streaming."""
    rows = with_targets(rows, genres)
    blocks = [rows.slice(start, ROWS_PER_BLOCK) for start in range(0, rows.num_rows, ROWS_PER_BLOCK)]
    return (
        ray.data.from_arrow(blocks)
        .map_batches(fetch_posters, fn_kwargs={"options": options})
        .map_batches(prepare_training_batch,
                     fn_kwargs={"image_size": image_size, "augment": augment})
    )
