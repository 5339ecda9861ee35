"""Markdown tables of metrics: the study's summary table, the per-genre table, and a fusion model's table of signal
subsets (no plotting imports: training jobs print these too)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from genre_pipeline.evaluate.metrics import SUMMARY_COLUMNS, GenreMetrics

PRIOR_ROW = "frequency prior"


def cell(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def render_summary_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """The study's table as Markdown: one row per model (e.g. `model`, `frequency prior`)."""
    header = "| | " + " | ".join(title for _, title in SUMMARY_COLUMNS) + " |"
    rule = "| --- |" + " ---: |" * len(SUMMARY_COLUMNS)
    lines = [f"| {name} | " + " | ".join(cell(values[key]) for key, _ in SUMMARY_COLUMNS) + " |"
             for name, values in rows.items()]
    return "\n".join([header, rule, *lines])


def render_per_genre_table(per_genre: Sequence[GenreMetrics]) -> str:
    header = "| genre | support | predicted | precision | recall | F1 | AP |"
    rule = "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    lines = [f"| {g.genre} | {g.support} | {g.predicted} | {cell(g.precision)} | {cell(g.recall)} | "
             f"{cell(g.f1)} | {cell(g.average_precision)} |" for g in per_genre]
    return "\n".join([header, rule, *lines])


def subset_lines(subset_metrics: Mapping[str, Mapping[str, float]], rows: int) -> list[str]:
    """A fusion checkpoint's validation table: one row per subset of signals, all on the same movies."""
    return [f"Validation, {rows} movies with every signal, each row scored with only the signals it names:", "",
            render_summary_table(subset_metrics), ""]
