"""The baseline the fine-tuning recipe must beat: frozen pretrained features + per-genre logistic regression.

    python benchmarks/linear_probe.py --catalog out/ml1m/catalog.parquet --arch efficientnet_lite0

Features are the backbone's mean+max pooled last convolution at the arch's own preprocessing (no training, no
augmentation), computed once per poster of the train split. One scikit-learn `LogisticRegression(C=0.001)` per
genre is fitted on the training rows and scored on the rows that training holds out (`--val-fraction`, the same
stable hash), with the study's threshold 0.3 and, for comparison, the micro-F1-tuned one. Needs scikit-learn
(a dev dependency).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from genre_pipeline.data import storage  # noqa: E402
from genre_pipeline.data.images import PreprocessSpec, decode_poster  # noqa: E402
from genre_pipeline.data.tensors import to_model_input  # noqa: E402
from genre_pipeline.evaluate.metrics import metrics_line, summary_metrics, tune_thresholds  # noqa: E402
from genre_pipeline.genres import DEFAULT_THRESHOLD, GENRES, encode_many  # noqa: E402
from genre_pipeline.model.architectures import PRETRAINED_ARCHS, build_model, default_preprocess  # noqa: E402
from genre_pipeline.train.rows import load_training_rows, split_rows  # noqa: E402

BATCH = 32


@torch.inference_mode()
def features(backbone: torch.nn.Module, rows: pa.Table, spec: PreprocessSpec) -> np.ndarray:
    uris = rows["poster_uri"].to_pylist()
    parts = []
    for start in range(0, len(uris), BATCH):
        images = np.stack([decode_poster(storage.read_bytes(uri), spec.shape) for uri in uris[start:start + BATCH]])
        parts.append(backbone(to_model_input(torch.from_numpy(images), spec)).numpy())
    return np.concatenate(parts)


def probe_scores(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, c: float) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    columns = []
    for genre in range(train_y.shape[1]):
        if train_y[:, genre].min() == train_y[:, genre].max():  # a genre with one class: its constant share
            columns.append(np.full(len(val_x), train_y[:, genre].mean()))
            continue
        model = LogisticRegression(C=c, max_iter=3000).fit(train_x, train_y[:, genre])
        columns.append(model.predict_proba(val_x)[:, 1])
    return np.stack(columns, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", required=True, help="catalogue Parquet with a train split")
    parser.add_argument("--arch", choices=PRETRAINED_ARCHS, default="efficientnet_lite0")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="the training job's --val-fraction")
    parser.add_argument("--c", type=float, default=0.001, help="inverse L2 strength of each logistic regression")
    args = parser.parse_args()
    train, val = split_rows(load_training_rows(args.catalog, storage.StorageOptions()), args.val_fraction)
    spec = default_preprocess(args.arch)
    # The baseline: the last convolution's pooled features alone, not the recipe's extra stages.
    backbone = build_model(arch=args.arch, num_genres=len(GENRES), pretrained=True, pooled_blocks=()).backbone.eval()
    started = time.perf_counter()
    train_x, val_x = features(backbone, train, spec), features(backbone, val, spec)
    print(f"{args.arch} features of {len(train_x) + len(val_x)} posters at {spec.describe()}: "
          f"{time.perf_counter() - started:.0f} s")
    train_y, val_y = encode_many(train["genres"].to_pylist()), encode_many(val["genres"].to_pylist())
    scores = probe_scores(train_x, train_y, val_x, args.c)
    for name, thresholds in (("threshold 0.3", np.full(len(GENRES), DEFAULT_THRESHOLD)),
                             ("micro-tuned", tune_thresholds(val_y, scores, objective="micro"))):
        metrics = summary_metrics(val_y, scores, scores >= thresholds)
        print(f"linear probe C={args.c}, {name} ({thresholds[0]:.2f}), {len(val_y)} rows: {metrics_line(metrics)}")


if __name__ == "__main__":
    main()
