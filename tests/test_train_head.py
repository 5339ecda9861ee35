"""The head phase on cached features: features per view, training that keeps the best validation epoch."""

import numpy as np
import torch
from torch import nn

from genre_pipeline.data.images import PreprocessSpec
from genre_pipeline.evaluate.metrics import mean_average_precision_at_k
from genre_pipeline.train.head import Features, extract_features, merge_features, train_head


def separable_features(rows: int, seed: int) -> Features:
    """Genre g's positives carry +2 on feature g: a linear head can learn it, a random one cannot."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((rows, 4)) < 0.3).astype(np.float32)
    values = rng.normal(size=(rows, 2, 8)).astype(np.float32)
    values[:, :, :4] += 2 * targets[:, None, :]
    return Features(values, targets)


def map_at_1(y_true: np.ndarray, scores: np.ndarray) -> float:
    return mean_average_precision_at_k(y_true, scores, 1)


def test_head_learns_and_keeps_its_best_validation_epoch():
    train, val = separable_features(400, seed=1), separable_features(100, seed=2)
    torch.manual_seed(0)
    head = nn.Linear(8, 4)
    with torch.inference_mode():
        before = map_at_1(val.targets, torch.sigmoid(head(torch.from_numpy(val.values[:, 0]))).numpy())
    seen = []

    def monitor(y_true, scores):
        seen.append(map_at_1(y_true, scores))
        return seen[-1]

    result = train_head(head, train, val, epochs=15, lr=0.05, weight_decay=0.0, loss_fn=nn.BCEWithLogitsLoss(),
                        monitor=monitor, seed=0)
    assert len(seen) == 15 and result.score == max(seen) and result.best_epoch == seen.index(max(seen)) + 1
    assert result.score > 0.9 > before + 0.2
    with torch.inference_mode():  # the head left behind is the best epoch's, not the last one's
        kept = torch.sigmoid(head(torch.from_numpy(val.values[:, 0]))).numpy()
    np.testing.assert_allclose(kept, result.scores, rtol=1e-6)
    np.testing.assert_array_equal(result.targets, val.targets)


def test_head_training_stops_after_patience_without_improvement():
    train, val = separable_features(200, seed=3), separable_features(50, seed=4)
    scores = iter([0.5, 0.6, 0.55, 0.55, 0.55, 0.9])
    result = train_head(nn.Linear(8, 4), train, val, epochs=6, lr=0.01, weight_decay=0.0,
                        loss_fn=nn.BCEWithLogitsLoss(), monitor=lambda y, s: next(scores), seed=0, patience=3)
    assert (result.best_epoch, result.score) == (2, 0.6)  # epochs 3-5 did not beat epoch 2: epoch 6 never ran


def test_features_of_every_view_and_rank_are_kept_in_order():
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    spec = PreprocessSpec(image_size=4)
    images = torch.randint(0, 256, (6, 4, 4, 3), dtype=torch.uint8)
    targets = torch.eye(6)[:, :3]
    batches = [{"image": images[:4], "target": targets[:4]}, {"image": images[4:], "target": targets[4:]}]
    features = extract_features(backbone, batches, spec, mirrored=True)
    assert features.values.shape == (6, 2, 5) and features.targets.shape == (6, 3)
    assert not np.allclose(features.values[:, 0], features.values[:, 1])  # the mirrored view differs
    symmetric = extract_features(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), batches, spec, mirrored=True)
    np.testing.assert_allclose(symmetric.values[:, 0], symmetric.values[:, 1], rtol=1e-5)  # a mean ignores flips
    empty = extract_features(backbone, [], spec, mirrored=True)
    merged = merge_features([features, empty, Features(features.values[:2], features.targets[:2])])
    assert merged.values.shape == (8, 2, 5)
    np.testing.assert_array_equal(merged.targets[6:], features.targets[:2])
