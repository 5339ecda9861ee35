"""The poster recipe's first phase: the genre head trained on cached features of a frozen backbone (see
`fitting`: every rank fits the same head; rank 0's is kept, and DDP broadcasts it when the model is wrapped next).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from genre_pipeline.data.images import PreprocessSpec
from genre_pipeline.train.fitting import backbone_views, keep_best_epoch

HEAD_BATCH_SIZE = 64  # rows of cached features per step: the head is one linear layer, steps are microseconds
HEAD_PATIENCE = 20  # head epochs without a better validation score before the phase stops


@dataclass(frozen=True)
class Features:
    values: np.ndarray  # (rows, views, width) float32
    targets: np.ndarray  # (rows, genres) multi-hot


@dataclass(frozen=True)
class HeadResult:
    scores: np.ndarray  # validation sigmoid scores of the best head epoch
    targets: np.ndarray  # validation targets, the same rows
    best_epoch: int  # 1-based head epoch the kept head comes from
    score: float  # the monitored metric of that epoch


def extract_features(backbone: nn.Module, batches: Iterable[dict[str, torch.Tensor]], spec: PreprocessSpec,
                     *, mirrored: bool) -> Features:
    """Pooled backbone features of every batch (eval mode); with `mirrored`, of the left-right flip too."""
    backbone.eval()
    values, targets = [], []
    for batch in batches:
        values.append(backbone_views(backbone, batch["image"], spec, 2 if mirrored else 1))
        targets.append(batch["target"].cpu().numpy())
    if not values:
        return Features(np.zeros((0, 2 if mirrored else 1, 0), np.float32), np.zeros((0, 0), np.float32))
    return Features(np.concatenate(values), np.concatenate(targets))


def merge_features(parts: list[Features]) -> Features:
    """One Features from every rank's (ranks without rows contribute nothing)."""
    kept = [part for part in parts if len(part.values)]
    return Features(np.concatenate([p.values for p in kept]), np.concatenate([p.targets for p in kept]))


def train_head(head: nn.Module, train: Features, val: Features, *, epochs: int, lr: float, weight_decay: float,
               loss_fn: nn.Module, monitor: Callable[[np.ndarray, np.ndarray], float], seed: int,
               patience: int = HEAD_PATIENCE) -> HeadResult:
    """Train `head` on every view of the training features; keep (load into `head`) its best epoch on validation.

    Validation uses the first view only (the poster as the label job sees it).
    """
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.from_numpy(train.values.reshape(-1, train.values.shape[-1]))
    targets = torch.from_numpy(np.repeat(train.targets, train.values.shape[1], axis=0))
    val_inputs = torch.from_numpy(val.values[:, 0])
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)

    def train_epoch(epoch: int) -> None:
        head.train()
        for index in torch.randperm(len(inputs), generator=generator).split(HEAD_BATCH_SIZE):
            loss = loss_fn(head(inputs[index]), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def score_epoch() -> tuple[float, np.ndarray]:
        head.eval()
        with torch.inference_mode():
            scores = torch.sigmoid(head(val_inputs)).numpy()
        return monitor(val.targets, scores), scores

    best = keep_best_epoch(head, epochs, train_epoch, score_epoch, patience)
    return HeadResult(best.scored, val.targets, best.epoch, best.score)
