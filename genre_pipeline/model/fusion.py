"""The fusion model: a poster backbone plus title and ratings embeddings, any subset of them present.

Each signal has its own encoder into a shared hidden space; a signal that is missing contributes a learned
"absent" vector instead, so the classifier sees which signals it has. Trained with modality dropout (each present
signal hidden at random), every subset of signals scores sensibly: a new movie without ratings, a movie without a
poster, or all three.
"""

from __future__ import annotations

import torch
from torch import nn

from genre_pipeline.model.signals import POSTER, SIGNAL_ORDER


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
