"""Multi-label metrics of the study: F1 (micro, macro, samples), mAP@K, per-genre AP, threshold tuning.

Pure numpy on `(rows, genres)` arrays in the vocabulary's column order: `y_true` and `predicted` are multi-hot
(anything > 0 counts as a label), `scores` are sigmoid outputs. No Ray here, so training (every epoch, on the
validation rows), the evaluation job and the tests share one definition of each number. F1 follows
`sklearn.metrics.f1_score(..., zero_division=0)`, mAP@K follows ml_metrics' `apk`, AP follows
`sklearn.metrics.average_precision_score`. No plotting library here: training workers import this module
(rendering lives in `tables.py` and `plots.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from genre_pipeline.genres import DEFAULT_THRESHOLD, GENRES

# The study reports mAP at these cut-offs; K=3 is also what training monitors to pick the best epoch.
MAP_KS = (1, 3, 5)

# Candidate thresholds for tuning; rounded so that a stored threshold reads 0.15, not 0.15000000000000002.
THRESHOLD_GRID = np.round(np.arange(0.05, 0.96, 0.05), 2)
THRESHOLD_GRID.flags.writeable = False  # a module-wide default argument: nobody may change it in place

SUMMARY_COLUMNS = (
    ("f1_micro", "F1 micro"), ("f1_macro", "F1 macro"), ("f1_samples", "F1 samples"),
    ("map_at_1", "mAP@1"), ("map_at_3", "mAP@3"), ("map_at_5", "mAP@5"),
)


@dataclass(frozen=True)
class GenreMetrics:
    """One genre's row of the per-genre table; `average_precision` is NaN for a genre without positives."""

    genre: str
    support: int  # rows where the genre is true
    predicted: int  # rows where it was predicted
    precision: float
    recall: float
    f1: float
    average_precision: float


@dataclass(frozen=True)
class MetricsReport:
    n_rows: int
    f1_micro: float
    f1_macro: float
    f1_samples: float
    map_at_1: float
    map_at_3: float
    map_at_5: float
    per_genre: tuple[GenreMetrics, ...]

    @property
    def mean_average_precision(self) -> float:
        """Macro AP over the genres that have positives (the others have no defined AP)."""
        values = [g.average_precision for g in self.per_genre if not math.isnan(g.average_precision)]
        return float(np.mean(values)) if values else math.nan

    def summary(self) -> dict[str, float]:
        return {name: getattr(self, name) for name, _ in SUMMARY_COLUMNS}

    def to_dict(self) -> dict:
        """JSON-ready: NaN becomes None (json.dumps would write the invalid token NaN)."""
        report = {"n_rows": self.n_rows, **self.summary(), "mean_average_precision": self.mean_average_precision,
                  "per_genre": [asdict(g) for g in self.per_genre]}
        return _nan_to_none(report)


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(item) for item in value]
    return value


def _as_bool(multi_hot: np.ndarray) -> np.ndarray:
    return np.asarray(multi_hot) > 0


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (sklearn's zero_division=0)."""
    numerator, denominator = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    out = np.zeros(np.broadcast(numerator, denominator).shape)
    return np.divide(numerator, denominator, out=out, where=denominator > 0)


def confusion_counts(y_true: np.ndarray, predicted: np.ndarray, axis: int | None) -> tuple[np.ndarray, ...]:
    """True positives, false positives, false negatives summed along `axis` (0: per genre, 1: per row)."""
    truth, guess = _as_bool(y_true), _as_bool(predicted)
    return (truth & guess).sum(axis=axis), (~truth & guess).sum(axis=axis), (truth & ~guess).sum(axis=axis)


def _f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    # 2tp / (2tp + fp + fn) is F1 without going through precision and recall: no 0/0 on the way.
    return _safe_divide(2 * tp, 2 * tp + fp + fn)


def f1_micro(y_true: np.ndarray, predicted: np.ndarray) -> float:
    return float(_f1_from_counts(*confusion_counts(y_true, predicted, axis=None)))


def f1_macro(y_true: np.ndarray, predicted: np.ndarray) -> float:
    """Mean over every genre column, those without support or predictions included (they count 0)."""
    return float(np.mean(_f1_from_counts(*confusion_counts(y_true, predicted, axis=0))))


def f1_samples(y_true: np.ndarray, predicted: np.ndarray) -> float:
    """Mean of per-row F1; a row with no true and no predicted genre counts 0, as sklearn does."""
    per_row = _f1_from_counts(*confusion_counts(y_true, predicted, axis=1))
    return float(per_row.mean()) if per_row.size else 0.0


def rank_genres(scores: np.ndarray) -> np.ndarray:
    """Genre indices per row, best score first; ties keep the vocabulary order (a stable sort)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), axis=1, kind="stable")


def mean_average_precision_at_k(y_true: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Mean apk@k over the rows with at least one true genre (apk is 0 by definition for the others,
    which would only dilute the mean); 0.0 when no row has one."""
    truth = _as_bool(y_true)
    with_truth = truth.any(axis=1)
    if not with_truth.any():
        return 0.0
    truth = truth[with_truth]
    ranked = rank_genres(np.asarray(scores)[with_truth])[:, :k]
    hits = np.take_along_axis(truth, ranked, axis=1).astype(np.float64)
    precision_at_i = np.cumsum(hits, axis=1) / np.arange(1, ranked.shape[1] + 1)
    apk = (precision_at_i * hits).sum(axis=1) / np.minimum(truth.sum(axis=1), k)
    return float(apk.mean())


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Ranking AP of one genre over all rows (= sklearn's average_precision_score); NaN without positives."""
    truth, scores = _as_bool(y_true).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    positives = truth.sum()
    if positives == 0:
        return math.nan
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_truth = scores[order], truth[order]
    # One point of the precision-recall curve per distinct score: tied rows cross the threshold together.
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    true_positives = np.cumsum(sorted_truth)[last_of_tie]
    precision = true_positives / (last_of_tie + 1)
    recall = true_positives / positives
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def per_genre_metrics(
    y_true: np.ndarray, scores: np.ndarray, predicted: np.ndarray, genres: Sequence[str] = GENRES
) -> tuple[GenreMetrics, ...]:
    tp, fp, fn = confusion_counts(y_true, predicted, axis=0)
    precision, recall, f1 = _safe_divide(tp, tp + fp), _safe_divide(tp, tp + fn), _f1_from_counts(tp, fp, fn)
    truth, scores = _as_bool(y_true), np.asarray(scores)
    return tuple(
        GenreMetrics(genre=genre, support=int(tp[i] + fn[i]), predicted=int(tp[i] + fp[i]),
                     precision=float(precision[i]), recall=float(recall[i]), f1=float(f1[i]),
                     average_precision=average_precision(truth[:, i], scores[:, i]))
        for i, genre in enumerate(genres)
    )


def summary_metrics(y_true: np.ndarray, scores: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """The study's six numbers; cheap enough for every epoch. F1 from `predicted`, mAP from `scores`."""
    return {
        "f1_micro": f1_micro(y_true, predicted),
        "f1_macro": f1_macro(y_true, predicted),
        "f1_samples": f1_samples(y_true, predicted),
        **{f"map_at_{k}": mean_average_precision_at_k(y_true, scores, k) for k in MAP_KS},
    }


def evaluate_scores(
    y_true: np.ndarray, scores: np.ndarray, predicted: np.ndarray, genres: Sequence[str] = GENRES
) -> MetricsReport:
    """Everything the evaluation report shows for one model (or baseline) on one set of rows."""
    if not np.shape(y_true) == np.shape(scores) == np.shape(predicted) or np.shape(y_true)[1] != len(genres):
        raise ValueError(f"shapes differ: y_true {np.shape(y_true)}, scores {np.shape(scores)}, "
                         f"predicted {np.shape(predicted)}, {len(genres)} genres")
    return MetricsReport(n_rows=len(y_true), **summary_metrics(y_true, scores, predicted),
                         per_genre=per_genre_metrics(y_true, scores, predicted, genres))


THRESHOLD_OBJECTIVES = ("micro", "macro", "samples")
# One threshold for all genres is tuned on every (row, genre) cell at once: a finer grid does not overfit it.
GLOBAL_THRESHOLD_GRID = np.round(np.arange(0.02, 0.96, 0.01), 2)
GLOBAL_THRESHOLD_GRID.flags.writeable = False


def tune_thresholds(
    y_true: np.ndarray, scores: np.ndarray, *, objective: str = "micro", min_positives: int = 5,
    default: float = DEFAULT_THRESHOLD,
) -> np.ndarray:
    """Per-genre thresholds (one per column) that maximise the F1 named by `objective` on these validation rows.

    `micro` and `samples` tune one threshold shared by every genre: every label counts, and one number fitted
    on all cells does not chase the few positives of a rare genre. `macro` tunes each genre for its own F1
    (rare genres get low thresholds: more of them found, at the cost of many false positives).
    """
    if objective not in THRESHOLD_OBJECTIVES:
        raise ValueError(f"threshold objective {objective!r}: expected one of {', '.join(THRESHOLD_OBJECTIVES)}")
    if objective == "macro":
        return tune_per_genre_thresholds(y_true, scores, min_positives=min_positives, default=default)
    score_fn = f1_micro if objective == "micro" else f1_samples
    scores = np.asarray(scores, dtype=np.float64)
    values = [score_fn(y_true, scores >= t) for t in GLOBAL_THRESHOLD_GRID]
    best = float(GLOBAL_THRESHOLD_GRID[int(np.argmax(values))]) if max(values, default=0) > 0 else default
    return np.full(np.shape(scores)[1], best)


def tune_per_genre_thresholds(
    y_true: np.ndarray, scores: np.ndarray, *, min_positives: int = 5, default: float = DEFAULT_THRESHOLD,
    grid: np.ndarray = THRESHOLD_GRID,
) -> np.ndarray:
    """Per genre, the grid threshold that maximises its F1 on these (validation) rows.

    A genre with fewer than `min_positives` positives, or whose F1 is 0 at every threshold, keeps `default`:
    a threshold fitted to one or two examples is noise. Among equally good thresholds the lowest wins.
    """
    truth, scores = _as_bool(y_true), np.asarray(scores, dtype=np.float64)
    grid = np.asarray(grid, dtype=np.float64)
    # (thresholds, genres); predictions use `>=`, like genres.labels_from_scores at inference.
    f1 = np.stack([_f1_from_counts(*confusion_counts(truth, scores >= t, axis=0)) for t in grid])
    best = np.argmax(f1, axis=0)  # argmax returns the first maximum: the lowest threshold among ties
    tunable = (truth.sum(axis=0) >= min_positives) & (f1.max(axis=0) > 0)
    return np.where(tunable, grid[best], default)


def metrics_line(metrics: dict[str, float]) -> str:
    """`name=value ...` in name order, 4 significant digits (row counts print whole)."""
    return " ".join(f"{name}={value:.4g}" for name, value in sorted(metrics.items()))


def frequency_prior(train_y: np.ndarray) -> np.ndarray:
    """Each genre's share of the training rows: the baseline that scores every movie the same."""
    train_y = np.asarray(train_y)
    if len(train_y) == 0:
        raise ValueError("frequency_prior needs at least one training row")
    return _as_bool(train_y).mean(axis=0)


def prior_scores(prior: np.ndarray, n_rows: int) -> np.ndarray:
    """The prior's score matrix for `n_rows` movies: the same genre frequencies on every row."""
    return np.tile(np.asarray(prior, dtype=np.float64), (n_rows, 1))
