"""A night's labels scored against the catalogue's true genres: `evaluate_night` returns an `EvaluationReport`.

Reads one night of the label job's Iceberg table (evaluate/night_labels.py) and the catalogue, keeps the catalogue
rows of a split, scores the model and the frequency prior on the same rows (evaluate/scoring.py) and, given the
checkpoint that wrote the labels, describes it (the model card). Everything happens in memory: the caller renders
the report (`tables.render_report`, `plots.report_figures`, `EvaluationReport.to_json`) and writes it, so a bad
input leaves nothing written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from genre_pipeline.config_fields import ISO_DATE, check_fields, option
from genre_pipeline.data import storage
from genre_pipeline.evaluate.metrics import MetricsReport, evaluate_scores
from genre_pipeline.evaluate.night_labels import EvaluationInputError, read_night_labels
from genre_pipeline.evaluate.scoring import (
    ALL_SPLITS,
    VALIDATION_SPLIT,
    Excluded,
    PriorResult,
    SignalGroup,
    check_catalog_genres,
    mark_validation_rows,
    metrics_by_signals,
    read_truth_catalog,
    score_prior,
    scored_rows,
    select_split,
    train_truth,
)
from genre_pipeline.label.contract import PARTITION_KEY
from genre_pipeline.label.table import DEFAULT_TABLE, EMBEDDED_CATALOG, TableSettings, catalog_properties
from genre_pipeline.model.checkpoints import CheckpointError, ModelMeta, read_meta


@dataclass(frozen=True)
class EvaluateConfig:
    """The evaluation job's settings; each field's metadata is its flag (genre-evaluate, jobs/evaluate.py)."""

    labels: str = field(metadata=option(
        "the label job's --output: the labels warehouse folder (local or s3://), where the embedded catalog lives"))
    catalog: str = field(metadata=option("catalogue Parquet file or directory (local or s3://)"))
    split: str = field(default="test", metadata=option(f"catalogue split to evaluate; '{ALL_SPLITS}' for every row"))
    run_date: str | None = field(default=None, metadata=option(
        "the night YYYY-MM-DD, by its snapshot's tag night-<date>; default: the latest night (the table's current "
        "snapshot)", check=ISO_DATE))
    table_catalog: str = field(default=EMBEDDED_CATALOG, metadata=option(
        f"the label job's --table-catalog: '{EMBEDDED_CATALOG}' (SQLite in a local --labels folder), or the name "
        "of a catalog configured in PYICEBERG_CATALOG__<NAME>__* variables or ~/.pyiceberg.yaml"))
    table: str = field(default=DEFAULT_TABLE, metadata=option("the label job's --table, namespace.name"))
    out: str | None = field(default=None, metadata=option(
        "output directory (local or s3://); default: evaluation/run_date=<date>/split=<split>"))
    val_fraction: float | None = field(default=None, metadata=option(
        f"the training job's --val-fraction: its held-out train rows become split '{VALIDATION_SPLIT}' (evaluate "
        f"with --split {VALIDATION_SPLIT}); the prior then comes from the remaining train rows"))
    model: str | None = field(default=None, metadata=option(
        "the checkpoint that wrote these labels (local or s3://): the report then shows its backbone, initial "
        "weights, preprocessing, thresholds and recipe"))
    storage_options: storage.StorageOptions = storage.StorageOptions()  # the storage flags'

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def table_settings(self) -> TableSettings:
        return TableSettings(self.labels, self.table_catalog, self.table, self.storage_options)


@dataclass(frozen=True)
class LabelsSource:
    """Which labels were evaluated: the table, its catalog and warehouse, and the night's snapshot."""

    table: str
    catalog: str
    warehouse: str
    snapshot_id: int


@dataclass(frozen=True)
class RowCounts:
    in_split: int  # catalogue rows of the split
    evaluated: int
    excluded: Excluded


@dataclass(frozen=True)
class FusionCard:
    """What the report shows of a fusion model: its tables' versions and its per-subset validation table."""

    embeddings: dict[str, dict[str, Any]]  # signal -> version, space, method, dim
    subset_metrics: dict[str, dict[str, float]]
    validation_rows: int


@dataclass(frozen=True)
class ModelCard:
    """What made the labels, from the checkpoint's meta."""

    uri: str
    model_version: str
    arch: str
    weights_source: dict[str, Any]
    preprocess: dict[str, Any]  # PreprocessSpec.to_dict()
    threshold_objective: str
    thresholds: dict[str, float]  # genre -> threshold
    epoch: int
    recipe: dict[str, Any]
    validation_metrics: dict[str, float]
    signals: list[str]
    pooled_blocks: list[int]
    fusion: FusionCard | None = None

    def to_json(self) -> dict:
        card = asdict(self)
        if self.fusion is None:
            del card["fusion"]
        return card


@dataclass(frozen=True)
class EvaluationReport:
    """One night's labels scored on one split: what `evaluate_night` returns, rendered by `tables.render_report`
    (report.md), `plots.report_figures` and `to_json` (report.json)."""

    labels: LabelsSource
    run_date: str
    catalog: str  # the catalogue's URI
    split: str
    model_versions: list[str]  # the models that wrote the night's rows
    genres: list[str]  # the night's vocabulary
    rows: RowCounts
    model: MetricsReport
    by_signals: dict[str, SignalGroup]  # the model by the signals that scored each movie
    frequency_prior: PriorResult | None  # None without train rows
    card: ModelCard | None = None  # given the checkpoint that wrote the labels
    # The figures' inputs (not in report.json): movies per genre among the train rows and the evaluated rows.
    train_genre_counts: tuple[int, ...] = ()
    evaluated_genre_counts: tuple[int, ...] = ()

    def to_json(self) -> dict:
        """report.json's content."""
        return {
            "labels": asdict(self.labels),
            "run_date": self.run_date, "catalog": self.catalog, "split": self.split,
            "model_versions": self.model_versions,
            "genres": self.genres,
            "rows": asdict(self.rows),
            "model": {**self.model.to_dict(), **({"card": self.card.to_json()} if self.card else {})},
            "by_signals": {name: group.to_json() for name, group in self.by_signals.items()},
            "frequency_prior": self.frequency_prior.to_json() if self.frequency_prior else None,
        }


def fusion_card(meta: ModelMeta) -> FusionCard | None:
    spec = meta.fusion_spec
    if spec is None:
        return None
    return FusionCard(embeddings={signal: {key: table[key] for key in ("version", "space", "method", "dim")}
                                  for signal, table in spec.embeddings.items()},
                      subset_metrics=spec.subset_metrics, validation_rows=spec.validation_rows)


def model_card(uri: str, model_versions: list[str], options: storage.StorageOptions) -> ModelCard:
    """What made the labels, from the checkpoint's meta; refused when the labels came from another model."""
    try:
        meta = read_meta(uri, options)
    except CheckpointError as error:
        raise EvaluationInputError(str(error)) from None
    if meta.model_version not in model_versions:
        raise EvaluationInputError(f"--model {uri} is {meta.model_version}, but the labels were written by "
                                   f"{', '.join(model_versions)}")
    return ModelCard(uri=uri, model_version=meta.model_version, arch=meta.arch,
                     weights_source=meta.weights_source or {"kind": "not recorded"},
                     preprocess=meta.preprocess.to_dict(), threshold_objective=meta.threshold_objective,
                     thresholds=dict(zip(meta.genres, meta.thresholds, strict=True)), epoch=meta.epoch,
                     recipe=meta.recipe, validation_metrics=meta.metrics, signals=meta.signals,
                     pooled_blocks=meta.pooled_blocks, fusion=fusion_card(meta))


def genre_counts(multi_hot: np.ndarray) -> tuple[int, ...]:
    return tuple(int(count) for count in multi_hot.sum(axis=0))


def evaluate_night(config: EvaluateConfig) -> EvaluationReport:
    """Read, check and score one night's labels on the catalogue split `config.split`."""
    night = read_night_labels(config.table_settings, config.run_date)
    labels, genres = night.rows, night.genres
    catalog = read_truth_catalog(config.catalog, config.split, config.storage_options)
    if config.val_fraction is not None:
        catalog = mark_validation_rows(catalog, config.val_fraction)
    check_catalog_genres(catalog, genres, config.catalog)
    split_rows = select_split(catalog, config.split, config.catalog)
    rows = scored_rows(split_rows, labels, genres, night.source)
    train_y = train_truth(catalog, genres)
    model_versions = night.model_versions
    return EvaluationReport(
        labels=LabelsSource(table=night.table, catalog=config.table_catalog, warehouse=config.labels,
                            snapshot_id=night.snapshot_id),
        run_date=night.run_date, catalog=config.catalog, split=config.split,
        model_versions=model_versions, genres=genres,
        rows=RowCounts(in_split=split_rows.num_rows, evaluated=len(rows.y_true), excluded=rows.excluded),
        model=evaluate_scores(rows.y_true, rows.scores, rows.predicted, genres),
        by_signals=metrics_by_signals(rows),
        frequency_prior=score_prior(train_y, rows, genres),
        card=model_card(config.model, model_versions, config.storage_options) if config.model else None,
        train_genre_counts=genre_counts(train_y), evaluated_genre_counts=genre_counts(rows.y_true),
    )


def output_folder(config: EvaluateConfig, report: EvaluationReport) -> str:
    """`--out`, or evaluation/run_date=<date>/split=<split>."""
    return config.out or storage.join("evaluation", f"{PARTITION_KEY}={report.run_date}", f"split={config.split}")


def check_storage(config: EvaluateConfig) -> None:
    """Fail fast, naming the URI, when an input cannot be read or `--out` written (endpoint, credentials, bucket,
    prefix), or the embedded catalog is asked of an s3:// --labels, before the evaluation's work."""
    catalog_properties(config.table_settings)
    storage.check_readable(config.labels, config.storage_options)
    storage.check_readable(config.catalog, config.storage_options)
    if config.out:
        storage.check_writable(config.out, config.storage_options)


def write_outputs(out: str, files: dict[str, bytes], options: storage.StorageOptions) -> None:
    with storage.reporting_errors(out, "write"):
        for name, data in files.items():
            storage.write_bytes(storage.join(out, name), data, options)

