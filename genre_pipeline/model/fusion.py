"""The fusion model: a poster backbone plus title and ratings embeddings, any subset of them present.

Each signal has its own encoder into a shared hidden space; a signal that is missing contributes a learned
"absent" vector instead, so the classifier sees which signals it has. Trained with modality dropout (each present
signal hidden at random), every subset of signals scores sensibly: a new movie without ratings, a movie without a
poster, or all three.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch import nn

from genre_pipeline.model.signals import POSTER, SIGNAL_ORDER
from genre_pipeline.signals.join import embedding_column, signal_matrix
from genre_pipeline.statuses import STATUS_OK


@dataclass(frozen=True)
class FusionSpec:
    """A fusion model's part of its checkpoint meta (`ModelMeta.fusion`, stored as this JSON object): the hidden
    width, each signal's input width, the embedding tables it was trained on (uri, version, space, dim, method),
    thresholds per signal subset and validation metrics per subset, and how many validation rows made them."""

    hidden: int
    dims: dict[str, int]
    embeddings: dict[str, dict] = field(default_factory=dict)
    thresholds_by_signals: dict[str, list[float]] = field(default_factory=dict)
    subset_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    validation_rows: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> FusionSpec | None:
        """The spec a meta's `fusion` object holds; None for `{}` (a poster model's)."""
        if not data:
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def table_versions(self) -> dict[str, str]:
        """Each embedding signal's table version, by signal name."""
        return {signal: self.embeddings[signal]["version"] for signal in sorted(self.embeddings)}


@dataclass(frozen=True)
class FusionInputs:
    """A batch's signals as a fusion model takes them: `mask` (rows, signals in the model's order) with 1 where the
    signal is present, and each embedding signal's (rows, dim) float32 matrix (zeros where missing)."""

    signals: list[str]
    mask: np.ndarray
    embeddings: dict[str, np.ndarray]

    def present(self, signal: str) -> np.ndarray:
        return self.mask[:, self.signals.index(signal)] > 0

    def used(self) -> list[list[str]]:
        return [[s for s, present in zip(self.signals, row, strict=True) if present] for row in self.mask > 0]


def fusion_inputs(batch: Mapping[str, np.ndarray], signals: Sequence[str], dims: Mapping[str, int]) -> FusionInputs:
    """The one definition of which signals a row has, for training and serving alike: the poster where it decoded
    (`status` ok), an embedding where the joined `<signal>_embedding` column has the movie's vector."""
    count = len(batch["status"])
    present, embeddings = {}, {}
    for signal in signals:
        if signal == POSTER:
            present[signal] = batch["status"] == STATUS_OK
        else:
            embeddings[signal], present[signal] = signal_matrix(batch.get(embedding_column(signal)), count,
                                                                int(dims[signal]))
    mask = np.stack([present[s] for s in signals], axis=1).astype(np.float32)
    return FusionInputs(list(signals), mask, embeddings)


class FusionHead(nn.Module):
    """Per-signal encoders (LayerNorm, Linear, GELU) whose outputs are summed, then a classifier.

    `inputs[signal]` is (rows, dim) float32, `mask` (rows, signals) with 1 where the signal is present; a missing
    signal's row values are ignored.
    """

    def __init__(self, dims: dict[str, int], hidden: int, num_genres: int, dropout: float = 0.3) -> None:
        super().__init__()
        self.signals = [s for s in SIGNAL_ORDER if s in dims]
        self.encoders = nn.ModuleDict({
            s: nn.Sequential(nn.LayerNorm(dims[s]), nn.Dropout(dropout), nn.Linear(dims[s], hidden), nn.GELU())
            for s in self.signals})
        self.absent = nn.Parameter(torch.zeros(len(self.signals), hidden))
        self.classifier = nn.Sequential(nn.LayerNorm(hidden), nn.Dropout(dropout), nn.Linear(hidden, num_genres))

    def forward(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        fused = 0
        for index, signal in enumerate(self.signals):
            present = mask[:, index:index + 1]
            encoded = self.encoders[signal](torch.nan_to_num(inputs[signal]))
            fused = fused + present * encoded + (1 - present) * self.absent[index]
        return self.classifier(fused)


class FusionNet(nn.Module):
    """`backbone` (images -> pooled features) feeding a FusionHead's poster encoder; without a poster signal the
    backbone is None."""

    def __init__(self, backbone: nn.Module | None, head: FusionHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor | None, embeddings: dict[str, torch.Tensor],
                mask: torch.Tensor) -> torch.Tensor:
        inputs = dict(embeddings)
        if self.backbone is not None:
            inputs[POSTER] = self.poster_features(images, mask)
        return self.head(inputs, mask)

    def poster_features(self, images: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """Backbone features of the rows that have a poster; zeros elsewhere (the head ignores them)."""
        rows = mask.shape[0]
        width = self.head.encoders[POSTER][0].normalized_shape[0]
        features = torch.zeros(rows, width, dtype=torch.float32, device=mask.device)
        present = mask[:, 0] > 0
        if images is not None and bool(present.any()):
            features[present] = self.backbone(images[present]).float()
        return features
