"""Ray Train worker loop of the fusion model: cached signals, modality dropout, per-subset thresholds.

The poster backbone stays frozen (its ImageNet features; a backbone fine-tuned on the same posters would give
training rows over-confident poster features the fusion head would learn to trust). So every row's signals are
computed once: each rank turns its shards into poster features (as is and mirrored) plus the joined title and
ratings embeddings, all ranks gather everything and train the same head from the same seed; rank 0 checkpoints.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import ray.train
import ray.train.torch
import torch
from torch import nn

from genre_pipeline.data import storage
from genre_pipeline.data.images import PreprocessSpec
from genre_pipeline.evaluate.metrics import (
    frequency_prior,
    mean_average_precision_at_k,
    prior_scores,
    summary_metrics,
)
from genre_pipeline.evaluate.tables import PRIOR_ROW
from genre_pipeline.genres import DEFAULT_THRESHOLD
from genre_pipeline.model.architectures import build_model
from genre_pipeline.model.checkpoints import ModelMeta, runtime_versions
from genre_pipeline.model.fusion import FusionHead, FusionNet, FusionSpec, fusion_inputs
from genre_pipeline.model.signals import POSTER, all_subsets, subset_name
from genre_pipeline.train.fitting import (
    TRAIN_DATASET,
    VAL_DATASET,
    BestEpoch,
    backbone_views,
    gather_objects,
    keep_best_epoch,
    report_checkpoint,
    tuned_metrics,
)
from genre_pipeline.train.rows import batch_targets

logger = logging.getLogger(__name__)

FUSION_BATCH_SIZE = 64  # rows of cached signals per step
MONITOR = "val_mean_subset_map_at_3"  # the mean over signal subsets: every subset must score, not just "all"


@dataclass(frozen=True)
class FusionLoopConfig:
    """Everything a fusion worker needs; built on the driver, shipped to every worker."""

    arch: str  # the poster backbone
    genres: list[str]
    preprocess: PreprocessSpec
    signals: tuple[str, ...]  # in SIGNAL_ORDER
    dims: dict[str, int]  # each signal's input width (the poster's: the backbone's pooled features)
    embeddings: dict[str, dict]  # per embedding signal: its table's uri, version and space
    hidden: int = 256
    dropout: float = 0.3
    signal_dropout: float = 0.5  # chance each present signal is hidden from a training row
    epochs: int = 200
    patience: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 32  # images per backbone pass
    threshold_objective: str = "micro"
    seed: int = 0
    data_fingerprint: str = ""
    weights_source: dict[str, str] = field(default_factory=dict)
    storage_options: storage.StorageOptions = field(default_factory=storage.StorageOptions)


@dataclass(frozen=True)
class SignalRows:
    """Cached signals of some rows: `poster` (rows, views, width), embeddings (rows, dim), `mask` (rows, signals)
    with 1 where the signal is present, multi-hot `targets`."""

    poster: np.ndarray
    embeddings: dict[str, np.ndarray]
    mask: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)

    def take(self, rows: np.ndarray) -> SignalRows:
        return SignalRows(self.poster[rows], {s: e[rows] for s, e in self.embeddings.items()}, self.mask[rows],
                          self.targets[rows])


def merge_rows(parts: list[SignalRows]) -> SignalRows:
    kept = [part for part in parts if len(part)]
    return SignalRows(np.concatenate([p.poster for p in kept]),
                      {s: np.concatenate([p.embeddings[s] for p in kept]) for s in kept[0].embeddings},
                      np.concatenate([p.mask for p in kept]), np.concatenate([p.targets for p in kept]))


@torch.inference_mode()
def poster_features(backbone: nn.Module, images: np.ndarray, ok: np.ndarray, spec: PreprocessSpec,
                    *, width: int, views: int, batch_size: int) -> np.ndarray:
    """(rows, views, width) features of the rows with a decoded poster (zeros elsewhere); view 2 is mirrored."""
    out = np.zeros((len(images), views, width), np.float32)
    rows = np.flatnonzero(ok)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        out[chunk] = backbone_views(backbone, torch.from_numpy(np.ascontiguousarray(images[chunk])), spec, views)
    return out


def signal_rows(batch: dict[str, np.ndarray], backbone: nn.Module | None, config: FusionLoopConfig,
                *, views: int) -> SignalRows:
    """One batch of joined, decoded rows -> its cached signals (which ones a row has: `fusion_inputs`, as serving
    decides it)."""
    inputs = fusion_inputs(batch, config.signals, config.dims)
    poster = np.zeros((len(inputs.mask), views, 0), np.float32)
    if POSTER in config.signals:
        poster = poster_features(backbone, batch["image"], inputs.present(POSTER), config.preprocess,
                                 width=config.dims[POSTER], views=views, batch_size=config.batch_size)
    return SignalRows(poster, inputs.embeddings, inputs.mask, batch_targets(batch))


def collect(dataset: str, backbone: nn.Module | None, config: FusionLoopConfig, *, views: int) -> SignalRows:
    """Every rank's rows of `dataset`, on every rank."""
    shard = ray.train.get_dataset_shard(dataset)
    parts = [signal_rows(batch, backbone, config, views=views)
             for batch in shard.iter_batches(batch_size=config.batch_size, batch_format="numpy")]
    return merge_rows([row for part in gather_objects(parts) for row in part])


def inputs_of(rows: SignalRows, view: np.ndarray | int = 0) -> dict[str, torch.Tensor]:
    inputs = {s: torch.from_numpy(e) for s, e in rows.embeddings.items()}
    if rows.poster.shape[-1]:
        picked = rows.poster[np.arange(len(rows)), view]
        inputs[POSTER] = torch.from_numpy(np.ascontiguousarray(picked))
    return inputs


def dropped_signals(mask: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Modality dropout: hide each present signal with probability `rate`; a row never loses all of them."""
    kept = mask * (torch.rand(mask.shape, generator=generator) >= rate).float()
    emptied = kept.sum(dim=1) == 0
    kept[emptied] = mask[emptied]
    return kept


def subset_mask(mask: np.ndarray, signals: tuple[str, ...], subset: tuple[str, ...]) -> np.ndarray:
    """The rows' mask with only `subset`'s signals kept."""
    keep = np.array([s in subset for s in signals], dtype=np.float32)
    return mask * keep[None, :]


def complete_rows(rows: SignalRows) -> SignalRows:
    """The rows that have every signal: each subset is scored on these same rows."""
    return rows.take(np.flatnonzero(rows.mask.min(axis=1) > 0))


@torch.inference_mode()
def score_subsets(head: FusionHead, rows: SignalRows, signals: tuple[str, ...]) -> dict[str, np.ndarray]:
    head.eval()
    inputs = inputs_of(rows)
    return {subset_name(subset): torch.sigmoid(head(inputs, torch.from_numpy(subset_mask(rows.mask, signals,
                                                                                          subset)))).numpy()
            for subset in all_subsets(signals)}


def prior_metrics(train_targets: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """The frequency prior on these rows: every movie scored with the training genre shares."""
    scores = prior_scores(frequency_prior(train_targets), len(targets)).astype(np.float32)
    return summary_metrics(targets, scores, (scores >= DEFAULT_THRESHOLD).astype(np.float32))


def subset_results(scores: dict[str, np.ndarray], targets: np.ndarray, objective: str
                   ) -> tuple[dict[str, dict[str, float]], dict[str, list[float]]]:
    """Per subset: summary metrics at thresholds tuned for `objective` on these rows, and those thresholds."""
    metrics, thresholds = {}, {}
    for name, subset_scores in scores.items():
        metrics[name], tuned = tuned_metrics(targets, subset_scores, objective)
        thresholds[name] = tuned.tolist()
    return metrics, thresholds


def mean_subset_map(head: FusionHead, rows: SignalRows, signals: tuple[str, ...]) -> float:
    scores = score_subsets(head, rows, signals)
    return float(np.mean([mean_average_precision_at_k(rows.targets, s, 3) for s in scores.values()]))


def train_fusion_head(head: FusionHead, train: SignalRows, val: SignalRows, config: FusionLoopConfig) -> BestEpoch:
    """Epochs of modality-dropout training on the cached signals; keeps (loads) the best epoch on validation."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    views = train.poster.shape[1]
    targets, mask = torch.from_numpy(train.targets), torch.from_numpy(train.mask)

    def train_epoch(epoch: int) -> None:
        head.train()
        view = torch.randint(views, (len(train),), generator=generator).numpy()
        inputs = inputs_of(train, view)
        for index in torch.randperm(len(train), generator=generator).split(FUSION_BATCH_SIZE):
            kept = dropped_signals(mask[index], config.signal_dropout, generator)
            logits = head({s: x[index] for s, x in inputs.items()}, kept)
            loss = loss_fn(logits, targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return keep_best_epoch(head, config.epochs, train_epoch,
                           lambda: (mean_subset_map(head, val, config.signals), None), config.patience)


def fusion_meta(config: FusionLoopConfig, metrics: dict[str, float], subsets: dict[str, dict[str, float]],
                thresholds: dict[str, list[float]], validation_rows: int) -> ModelMeta:
    everything = subset_name(config.signals)
    return ModelMeta(
        arch=config.arch, genres=list(config.genres), preprocess=config.preprocess,
        thresholds=thresholds[everything], threshold_objective=config.threshold_objective, metrics=metrics,
        data_fingerprint=config.data_fingerprint, weights_source=dict(config.weights_source),
        recipe={"hidden": config.hidden, "dropout": config.dropout, "signal_dropout": config.signal_dropout,
                "epochs": config.epochs, "patience": config.patience, "lr": config.lr,
                "weight_decay": config.weight_decay, "seed": config.seed},
        versions=runtime_versions(), signals=list(config.signals),
        fusion=FusionSpec(hidden=config.hidden, dims=dict(config.dims), embeddings=dict(config.embeddings),
                          thresholds_by_signals=thresholds, subset_metrics=subsets,
                          validation_rows=validation_rows).to_dict())


def flat_metrics(subsets: dict[str, dict[str, float]], rows: int, best_epoch: int, score: float) -> dict[str, float]:
    metrics = {f"val_{name}_{metric}": value for name, values in subsets.items() for metric, value in values.items()}
    return {**metrics, MONITOR: score, "val_rows": float(rows), "head_best_epoch": float(best_epoch)}


def fusion_loop_per_worker(loop_config: dict) -> None:
    config: FusionLoopConfig = loop_config["config"]
    torch.set_num_threads(max(1, int(loop_config.get("cpus_per_worker") or 1)))
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    backbone = None
    if POSTER in config.signals:
        backbone = build_model(arch=config.arch, num_genres=len(config.genres), pretrained=True).backbone.eval()
    train = collect(TRAIN_DATASET, backbone, config, views=2)
    val = complete_rows(collect(VAL_DATASET, backbone, config, views=1))
    if not len(val):
        raise ValueError("no validation row has every signal: give tables that cover the catalogue's movies")
    feature_seconds = time.perf_counter() - started
    head = FusionHead(config.dims, config.hidden, len(config.genres), config.dropout)
    result = train_fusion_head(head, train, val, config)
    subsets, thresholds = subset_results(score_subsets(head, val, config.signals), val.targets,
                                         config.threshold_objective)
    metrics = {**flat_metrics(subsets, len(val), result.epoch, result.score),
               "feature_seconds": feature_seconds, "train_rows": float(len(train)),
               "seconds": time.perf_counter() - started}
    subsets[PRIOR_ROW] = prior_metrics(train.targets, val.targets)
    report_checkpoint(FusionNet(backbone, head), fusion_meta(config, metrics, subsets, thresholds, len(val)), metrics,
                      label="fusion")
