"""The evaluation report's figures (matplotlib): genre distribution per split and F1 per genre, as PNG."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from matplotlib.figure import Figure

from genre_pipeline.evaluate.metrics import GenreMetrics
from genre_pipeline.evaluate.scoring import TRAIN_SPLIT
from genre_pipeline.genres import GENRES

if TYPE_CHECKING:
    from genre_pipeline.evaluate.evaluation import EvaluationReport


def _save(figure: Figure, path: str | Path | BinaryIO) -> None:
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=120)


def plot_genre_distribution(
    train_counts: Sequence[int], test_counts: Sequence[int], path: str | Path | BinaryIO, *,
    genres: Sequence[str] = GENRES, split_names: tuple[str, str] = ("train", "test"),
) -> None:
    """Grouped bar chart of genre counts per split, as in the study's figures; PNG to a path or binary file."""
    # A bare Figure renders with Agg and touches no pyplot global state: safe in jobs, tests and threads.
    figure = Figure(figsize=(12, 5))
    axes = figure.add_subplot()
    positions, width = np.arange(len(genres)), 0.4
    axes.bar(positions - width / 2, train_counts, width, label=split_names[0])
    axes.bar(positions + width / 2, test_counts, width, label=split_names[1])
    axes.set_xticks(positions, list(genres), rotation=45, ha="right")
    axes.set_ylabel("movies")
    axes.set_title("Genre distribution per split")
    axes.legend()
    _save(figure, path)


def plot_per_genre_f1(per_genre: Sequence[GenreMetrics], path: str | Path | BinaryIO) -> None:
    """Horizontal bars of each genre's F1, its support written beside the bar (rare genres explain low F1)."""
    figure = Figure(figsize=(8, 6))
    axes = figure.add_subplot()
    positions = np.arange(len(per_genre))
    bars = axes.barh(positions, [g.f1 for g in per_genre])
    axes.bar_label(bars, labels=[f"n={g.support}" for g in per_genre], padding=3, fontsize=8)
    axes.set_yticks(positions, [g.genre for g in per_genre])
    axes.invert_yaxis()  # the vocabulary order, top to bottom
    axes.set_xlim(0, 1.1)
    axes.set_xlabel("F1")
    axes.set_title("F1 per genre")
    _save(figure, path)


def report_figures(
    train_counts: Sequence[int], evaluated_counts: Sequence[int], per_genre: Sequence[GenreMetrics], *,
    genres: Sequence[str], split_names: tuple[str, str],
) -> dict[str, bytes]:
    """The report's two figures, PNG bytes by file name: rendered in memory, written by the caller."""
    distribution, f1 = io.BytesIO(), io.BytesIO()
    plot_genre_distribution(train_counts, evaluated_counts, distribution, genres=genres, split_names=split_names)
    plot_per_genre_f1(per_genre, f1)
    return {"genre_distribution.png": distribution.getvalue(), "per_genre_f1.png": f1.getvalue()}


def evaluation_figures(report: EvaluationReport) -> dict[str, bytes]:
    """The evaluation's figures: the genres of the train rows beside those of the evaluated rows, and the model's
    F1 per genre."""
    return report_figures(report.train_genre_counts, report.evaluated_genre_counts, report.model.per_genre,
                          genres=report.genres, split_names=(TRAIN_SPLIT, f"{report.split} (evaluated)"))
