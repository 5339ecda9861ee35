"""Markdown of metrics: the study's summary table, the per-genre table, a fusion model's table of signal subsets, and
the evaluation's report.md (`render_report`, from an `EvaluationReport`). No plotting imports, and the evaluation's
types only for annotations: training jobs print these tables too."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from genre_pipeline.data.images import PreprocessSpec
from genre_pipeline.evaluate.metrics import SUMMARY_COLUMNS, GenreMetrics, metrics_line
from genre_pipeline.genres import DEFAULT_THRESHOLD
from genre_pipeline.model.signals import POSTER

if TYPE_CHECKING:
    from genre_pipeline.evaluate.evaluation import EvaluationReport, ModelCard
    from genre_pipeline.evaluate.scoring import SignalGroup

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


def features_line(pooled_blocks: Sequence[int]) -> str:
    stages = f" and of stages {', '.join(map(str, pooled_blocks))}" if pooled_blocks else ""
    return f"the backbone's mean+max pooled output of its last convolution{stages}"


def render_model_card(card: ModelCard) -> list[str]:
    details = {key: value for key, value in card.weights_source.items() if key != "kind"}
    source = card.weights_source["kind"] + "".join(f", {key} {value}" for key, value in sorted(details.items()))
    spec = PreprocessSpec.from_dict(card.preprocess)
    thresholds = sorted(set(card.thresholds.values()))
    recipe = ", ".join(f"{key}={value}" for key, value in card.recipe.items()) or "not recorded"
    return [
        "## Model", "",
        f"- `{card.model_version}` from `{card.uri}`: arch `{card.arch}`, epoch {card.epoch}",
        f"- initial weights: {source}",
        f"- preprocessing: {spec.describe()}",
        f"- features: {features_line(card.pooled_blocks)}",
        f"- thresholds: tuned for {card.threshold_objective}-F1 on validation "
        f"({'one threshold, ' + str(thresholds[0]) if len(thresholds) == 1 else 'per genre'})",
        f"- recipe: {recipe}",
        f"- validation at that epoch: {metrics_line(card.validation_metrics)}", "",
        *fusion_lines(card),
    ]


def fusion_lines(card: ModelCard) -> list[str]:
    if card.fusion is None:
        return []
    fusion = card.fusion
    tables = [f"- {signal} embeddings: version {t['version']} ({t['method']}, {t['dim']} dims)"
              for signal, t in sorted(fusion.embeddings.items())]
    return [f"- signals: {', '.join(card.signals)}", *tables, "",
            *subset_lines(fusion.subset_metrics, fusion.validation_rows)]


def status_text(by_status: Mapping[str, int]) -> str:
    return ", ".join(f"{count} {status}" for status, count in by_status.items()) or "0"


def signal_group_lines(groups: Mapping[str, SignalGroup]) -> list[str]:
    """The model's rows by the signals that scored them, when more than posters did."""
    if set(groups) <= {POSTER}:
        return []
    rows = {f"{name} ({group.rows} movies)": group.metrics for name, group in groups.items()}
    return ["## By the signals that scored each movie", "", render_summary_table(rows), "",
            "Each row is the movies scored with those signals (a different set of movies per row; the model card "
            "compares subsets on the same movies).", ""]


def render_report(report: EvaluationReport) -> str:
    """report.md: where the labels came from, what was evaluated, the model card, the summary table (model and
    frequency prior), the per-genre table and the model by the signals that scored each movie."""
    rows, excluded, labels, prior = report.rows, report.rows.excluded, report.labels, report.frequency_prior
    table_rows = {"model": report.model.summary(), **({PRIOR_ROW: prior.metrics.summary()} if prior else {})}
    return "\n".join([
        f"# Genre labels vs catalogue: split {report.split!r}, night {report.run_date}",
        "",
        f"Labels: table `{labels.table}` (catalog `{labels.catalog}`), night {report.run_date} "
        f"(snapshot {labels.snapshot_id}; model {', '.join(report.model_versions)}); "
        f"catalogue `{report.catalog}`.",
        "",
        f"{rows.in_split} catalogue rows in the split, {rows.evaluated} evaluated. Not evaluated: "
        f"{excluded.no_label_row} without a label row, {status_text(excluded.status)} by label status, "
        f"{excluded.no_true_genres} without true genres.",
        "",
        *(render_model_card(report.card) if report.card else []),
        "## Summary",
        "",
        render_summary_table(table_rows),
        "",
        "The frequency prior scores every movie with the genre shares of the train split; its F1 uses threshold "
        f"{DEFAULT_THRESHOLD}." if prior else "No train rows with genres: no frequency prior.",
        "",
        "## Per genre (model)",
        "",
        render_per_genre_table(report.model.per_genre),
        "",
        f"Mean AP over the genres with positives: {report.model.mean_average_precision:.4f}.",
        "",
        *signal_group_lines(report.by_signals),
    ])
