import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score

from genre_pipeline.evaluate import metrics as ev
from genre_pipeline.evaluate import plots, tables
from genre_pipeline.genres import DEFAULT_THRESHOLD

# 5 rows x 4 genres. Row 3 has a true genre but no prediction, row 4 neither; genre 3 is never true
# (support 0) but is predicted once: the corners where zero_division matters.
Y_TRUE = np.array([
    [1, 0, 1, 0],
    [0, 1, 0, 0],
    [1, 1, 0, 0],
    [0, 0, 1, 0],
    [0, 0, 0, 0],
], dtype=np.float32)
PREDICTED = np.array([
    [1, 0, 0, 0],
    [0, 1, 1, 0],
    [1, 0, 0, 1],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
], dtype=np.float32)


def reference_apk(actual, ranked, k: int) -> float:
    """ml_metrics' apk, one row at a time: the definition the vectorised mAP@K is checked against."""
    actual, top = set(actual), list(ranked)[:k]
    if not actual:
        return 0.0
    hits, score = 0, 0.0
    for i, item in enumerate(top):
        if item in actual and item not in top[:i]:  # a repeated prediction is not a second hit
            hits += 1
            score += hits / (i + 1)
    return score / min(len(actual), k)


@pytest.mark.parametrize(("average", "ours"), [
    ("micro", ev.f1_micro), ("macro", ev.f1_macro), ("samples", ev.f1_samples),
])
def test_f1_matches_sklearn(average, ours):
    expected = f1_score(Y_TRUE, PREDICTED, average=average, zero_division=0)
    assert ours(Y_TRUE, PREDICTED) == pytest.approx(expected, abs=1e-12)


def test_f1_by_hand():
    # tp=3 (r0g0, r1g1, r2g0), fp=2 (r1g2, r2g3), fn=3 (r0g2, r2g1, r3g2): micro 2*3 / (6 + 2 + 3)
    assert ev.f1_micro(Y_TRUE, PREDICTED) == pytest.approx(6 / 11)
    # per row: 2/3, 2/3, 2/4, 0 (missed), 0 (nothing true, nothing predicted: zero_division=0)
    assert ev.f1_samples(Y_TRUE, PREDICTED) == pytest.approx((2 / 3 + 2 / 3 + 0.5) / 5)


def test_f1_matches_sklearn_on_random_arrays():
    rng = np.random.default_rng(3)
    y_true, predicted = rng.random((40, 18)) < 0.2, rng.random((40, 18)) < 0.2
    for average, ours in (("micro", ev.f1_micro), ("macro", ev.f1_macro), ("samples", ev.f1_samples)):
        assert ours(y_true, predicted) == pytest.approx(f1_score(y_true, predicted, average=average, zero_division=0))


@pytest.mark.parametrize(("actual", "ranked", "k", "expected"), [
    # hits at ranks 1 (precision 1/1) and 3 (precision 2/3); divided by min(|actual|=2, k=3)
    ({0, 2}, [2, 1, 0], 3, (1 / 1 + 2 / 3) / 2),
    # only rank 1 counts; min(2, 1) = 1
    ({0, 2}, [2, 1, 0], 1, 1.0),
    # a single hit at rank 2: precision 1/2, over min(1, 3)
    ({1}, [2, 1, 0], 3, 1 / 2),
    # a miss at rank 1, then hits at 2 (1/2) and 3 (2/3), over min(3, 3)
    ([0, 1, 3], [2, 1, 3], 3, (1 / 2 + 2 / 3) / 3),
    # the repeated 0 at rank 2 is not a second hit: 1/1 at rank 1, 2/3 at rank 3
    ({0, 2}, [0, 0, 2], 3, (1 / 1 + 2 / 3) / 2),
    (set(), [0, 1], 2, 0.0),
])
def test_reference_apk_by_hand(actual, ranked, k, expected):
    assert reference_apk(actual, ranked, k) == pytest.approx(expected)


def test_mean_average_precision_at_k_by_hand():
    y_true = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]])
    # row 0 ranks [2, 1, 0]; row 1 ties everywhere, so the vocabulary order [0, 1, 2] decides;
    # row 2 has no true genre and is left out of the mean.
    scores = np.array([[0.1, 0.5, 0.9], [0.4, 0.4, 0.4], [0.9, 0.1, 0.1]])
    # row 0: (1/1 + 2/3) / 2; row 1: hit at rank 2 -> (1/2) / 1
    assert ev.mean_average_precision_at_k(y_true, scores, 3) == pytest.approx(((1 + 2 / 3) / 2 + 1 / 2) / 2)
    # @1: row 0 hits, row 1 misses
    assert ev.mean_average_precision_at_k(y_true, scores, 1) == pytest.approx(1 / 2)
    assert ev.mean_average_precision_at_k(np.zeros((2, 3)), scores[:2], 3) == 0.0


def test_vectorised_map_agrees_with_apk():
    rng = np.random.default_rng(5)
    y_true, scores = rng.random((30, 18)) < 0.15, np.round(rng.random((30, 18)), 1)  # rounding makes ties
    ranked = ev.rank_genres(scores)
    for k in (1, 3, 5, 18):
        per_row = [reference_apk(set(np.flatnonzero(t)), r, k)
                   for t, r in zip(y_true, ranked, strict=True) if t.any()]
        assert ev.mean_average_precision_at_k(y_true, scores, k) == pytest.approx(np.mean(per_row))


def test_map_at_1_is_precision_at_1():
    rng = np.random.default_rng(11)
    y_true, scores = rng.random((50, 18)) < 0.2, rng.random((50, 18))
    with_truth = y_true.any(axis=1)
    top = np.argmax(scores, axis=1)
    precision_at_1 = y_true[np.arange(50), top][with_truth].mean()
    assert ev.mean_average_precision_at_k(y_true, scores, 1) == pytest.approx(precision_at_1)


def test_average_precision_matches_sklearn_with_ties():
    truth = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.8, 0.5, 0.5, 0.5, 0.1, 0.0])
    assert ev.average_precision(truth, scores) == pytest.approx(average_precision_score(truth, scores))
    assert math.isnan(ev.average_precision(np.zeros(4), np.ones(4)))


def test_per_genre_and_report():
    scores = np.where(Y_TRUE > 0, 0.8, 0.2) + np.linspace(0, 0.01, 4)
    report = ev.evaluate_scores(Y_TRUE, scores, PREDICTED, ["a", "b", "c", "d"])
    g0, *_, g3 = report.per_genre
    # genre 0: predicted rows 0 and 2, both true
    assert (g0.support, g0.predicted, g0.precision, g0.recall, g0.f1) == (2, 2, 1.0, 1.0, 1.0)
    # genre 3: never true -> AP undefined (NaN), left out of the mean; precision 0 (one false positive)
    assert (g3.support, g3.predicted, g3.precision) == (0, 1, 0.0) and math.isnan(g3.average_precision)
    assert report.mean_average_precision == pytest.approx(1.0)  # scores separate every genre perfectly
    assert report.to_dict()["per_genre"][3]["average_precision"] is None
    assert report.summary() == ev.summary_metrics(Y_TRUE, scores, PREDICTED)
    assert report.n_rows == 5 and report.f1_micro == pytest.approx(6 / 11)


def test_summary_metrics_keys():
    metrics = ev.summary_metrics(Y_TRUE, np.asarray(Y_TRUE, dtype=float), PREDICTED)
    assert list(metrics) == ["f1_micro", "f1_macro", "f1_samples", "map_at_1", "map_at_3", "map_at_5"]
    assert metrics["map_at_1"] == 1.0  # scores equal the truth: every top genre is right


def test_tune_thresholds_finds_best_and_keeps_default_for_rare_genres():
    # genre 0: positives score >= 0.45, the highest negative 0.43. At 0.40: tp 5, fp 1 -> F1 10/11;
    # at 0.45: tp 5, fp 0 -> F1 1; at 0.50: tp 4, fn 1 -> F1 8/9. Best: 0.45.
    genre0 = [0.45, 0.5, 0.6, 0.7, 0.8, 0.1, 0.2, 0.3, 0.36, 0.43]
    truth0 = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    # genre 1: only 2 positives (< min_positives=5): keeps the default, however well it separates.
    truth1 = [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    genre1 = [0.9, 0.9, 0, 0, 0, 0, 0, 0, 0, 0]
    # genre 2: 5 positives, but all score 0: F1 is 0 at every threshold, so the default stays.
    truth2 = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    genre2 = [0.0] * 10
    y_true, scores = np.array([truth0, truth1, truth2]).T, np.array([genre0, genre1, genre2]).T
    thresholds = ev.tune_thresholds(y_true, scores, objective="macro")
    assert thresholds.tolist() == pytest.approx([0.45, DEFAULT_THRESHOLD, DEFAULT_THRESHOLD])
    assert ev.tune_thresholds(y_true, scores, objective="macro", min_positives=2, default=0.5)[1:].tolist() == [
        0.05, 0.5]


# Two genres whose scores live on different scales: genre 0's positives score 0.6-0.9 (negatives 0.1-0.5),
# genre 1's positives 0.2-0.3 (negatives 0.0-0.1). Row 5 is a genre-1 positive that scores only 0.15.
OBJECTIVE_TRUTH = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 1], [0, 0], [0, 0]])
OBJECTIVE_SCORES = np.array([[0.9, 0.0], [0.8, 0.05], [0.6, 0.1], [0.5, 0.3], [0.1, 0.2], [0.3, 0.15],
                             [0.4, 0.0], [0.2, 0.1]])


def test_macro_objective_tunes_each_genre_for_its_own_f1():
    thresholds = ev.tune_thresholds(OBJECTIVE_TRUTH, OBJECTIVE_SCORES, objective="macro", min_positives=3)
    assert thresholds.tolist() == pytest.approx([0.55, 0.15])  # the lowest grid points that separate each genre
    assert ev.f1_macro(OBJECTIVE_TRUTH, thresholds <= OBJECTIVE_SCORES) == 1.0


def test_micro_objective_tunes_one_threshold_for_every_label():
    thresholds = ev.tune_thresholds(OBJECTIVE_TRUTH, OBJECTIVE_SCORES, objective="micro")
    assert len(set(thresholds.tolist())) == 1
    predicted = thresholds <= OBJECTIVE_SCORES
    best_by_brute_force = max(ev.f1_micro(OBJECTIVE_TRUTH, t <= OBJECTIVE_SCORES) for t in ev.GLOBAL_THRESHOLD_GRID)
    assert ev.f1_micro(OBJECTIVE_TRUTH, predicted) == best_by_brute_force
    # 0.11 keeps every positive (tp 6) and admits four genre-0 negatives (fp 4): 12 / 16.
    assert thresholds[0] == pytest.approx(0.11)
    assert ev.f1_micro(OBJECTIVE_TRUTH, predicted) == pytest.approx(0.75)


def test_samples_objective_maximises_per_row_f1():
    thresholds = ev.tune_thresholds(OBJECTIVE_TRUTH, OBJECTIVE_SCORES, objective="samples")
    best = max(ev.f1_samples(OBJECTIVE_TRUTH, t <= OBJECTIVE_SCORES) for t in ev.GLOBAL_THRESHOLD_GRID)
    assert ev.f1_samples(OBJECTIVE_TRUTH, thresholds <= OBJECTIVE_SCORES) == best
    assert len(set(thresholds.tolist())) == 1


def test_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="threshold objective 'weighted'"):
        ev.tune_thresholds(OBJECTIVE_TRUTH, OBJECTIVE_SCORES, objective="weighted")


def test_threshold_grid_is_clean():
    assert ev.THRESHOLD_GRID.tolist() == [round(0.05 * i, 2) for i in range(1, 20)]


def test_frequency_prior():
    train_y = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 1], [1, 0, 0]])
    prior = ev.frequency_prior(train_y)
    assert prior.tolist() == [0.75, 0.0, 0.5]
    scores = ev.prior_scores(prior, 2)
    assert scores.shape == (2, 3) and scores.tolist() == [[0.75, 0.0, 0.5]] * 2
    with pytest.raises(ValueError, match="at least one"):
        ev.frequency_prior(np.zeros((0, 3)))


def test_markdown_tables():
    table = tables.render_summary_table({"model": ev.summary_metrics(Y_TRUE, Y_TRUE, PREDICTED)})
    header, rule, row = table.splitlines()
    assert "F1 micro" in header and "mAP@5" in header and rule.startswith("| --- |")
    assert row.startswith("| model | 0.5455 |")  # 6/11
    metrics = ev.evaluate_scores(Y_TRUE, Y_TRUE, PREDICTED, ["a", "b", "c", "d"])
    assert tables.render_per_genre_table(metrics.per_genre).splitlines()[-1].endswith("| n/a |")


def test_plots_write_png(tmp_path):
    metrics = ev.evaluate_scores(Y_TRUE, Y_TRUE, PREDICTED, ["a", "b", "c", "d"])
    plots.plot_genre_distribution([3, 2, 1, 0], [1, 1, 0, 0], tmp_path / "dist.png", genres=["a", "b", "c", "d"])
    plots.plot_per_genre_f1(metrics.per_genre, tmp_path / "f1.png")
    for name in ("dist.png", "f1.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
