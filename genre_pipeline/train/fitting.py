"""What both recipes' Ray Train workers share: the dataset names, gathering every rank's rows, cached backbone
features, fitting on cached features while keeping the best epoch, metrics at tuned thresholds, and the
checkpoint report.

A frozen backbone gives the same features every epoch, so each poster goes through it once per view (as is and
mirrored) instead of once per epoch: dozens of epochs of a head on those features cost less than one pass over the
posters. Every rank computes the features of its shards, gathers everyone's and fits the same head on all of them
from the same seed; rank 0's is what gets kept.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from torch import nn

from genre_pipeline.data.images import PreprocessSpec
from genre_pipeline.data.tensors import to_model_input
from genre_pipeline.evaluate.metrics import metrics_line, summary_metrics, tune_thresholds
from genre_pipeline.model.checkpoints import ModelMeta, save_checkpoint

logger = logging.getLogger(__name__)

# The Ray Train dataset names both recipes use: training rows and validation rows.
TRAIN_DATASET, VAL_DATASET = "train", "val"
T = TypeVar("T")


def gather_objects(item: T) -> list[T]:
    """Every worker's `item`, in rank order (one item when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [item]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, item)  # objects, not a CPU tensor: works on gloo and nccl groups alike
    return parts


def gather_rows(array: np.ndarray) -> np.ndarray:
    """Concatenate every worker's rows (validation is sharded; every rank needs all of it to tune thresholds)."""
    return np.concatenate(gather_objects(array))


@torch.inference_mode()
def backbone_views(backbone: nn.Module, images: torch.Tensor, spec: PreprocessSpec, views: int) -> np.ndarray:
    """(rows, views, width) float32 pooled features of uint8 NHWC `images`: view 1 as is, view 2 mirrored."""
    inputs = to_model_input(images, spec)
    outputs = [backbone(inputs)] + ([backbone(torch.flip(inputs, dims=[3]))] if views == 2 else [])
    return torch.stack(outputs, dim=1).float().cpu().numpy()


@dataclass(frozen=True)
class BestEpoch(Generic[T]):
    """The epoch a fit kept: its 1-based number (0: none was run), its monitored score, and what scoring it gave."""

    epoch: int
    score: float
    scored: T | None = None


def keep_best_epoch(module: nn.Module, epochs: int, train_epoch: Callable[[int], None],
                    score_epoch: Callable[[], tuple[float, T]], patience: int) -> BestEpoch[T]:
    """`epochs` of `train_epoch(epoch)`, each scored by `score_epoch()` -> (score, what to keep with it); stops
    after `patience` epochs without a better score (0: never) and loads the best epoch's weights into `module`."""
    best: BestEpoch[T] | None = None
    best_state = copy.deepcopy(module.state_dict())
    for epoch in range(1, epochs + 1):
        train_epoch(epoch)
        score, scored = score_epoch()
        if best is None or score > best.score:
            best, best_state = BestEpoch(epoch, score, scored), copy.deepcopy(module.state_dict())
        elif patience and epoch - best.epoch >= patience:
            break
    module.load_state_dict(best_state)
    return best if best is not None else BestEpoch(0, -math.inf)


def tuned_metrics(y_true: np.ndarray, scores: np.ndarray, objective: str) -> tuple[dict[str, float], np.ndarray]:
    """Summary metrics at thresholds tuned on these rows for `objective`, and those thresholds."""
    thresholds = tune_thresholds(y_true, scores, objective=objective)
    return summary_metrics(y_true, scores, (scores >= thresholds).astype(np.float32)), thresholds


def report_checkpoint(model: nn.Module, meta: ModelMeta, metrics: dict[str, float], *, label: str,
                      reported: dict[str, float] | None = None,
                      write_more: Callable[[Path], None] | None = None) -> None:
    """Every rank reports `metrics` (+ `reported`) to Ray Train (it is a barrier); rank 0 alone writes the checkpoint
    (weights, meta, and what `write_more` adds to its directory) and logs `label: metrics`."""
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            save_checkpoint(directory, model, meta)
            if write_more is not None:
                write_more(Path(directory))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
            logger.info("%s: %s", label, metrics_line(metrics))
        ray.train.report({**metrics, **(reported or {})}, checkpoint=checkpoint)
