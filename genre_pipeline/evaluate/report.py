"""The evaluation report: a night's labels joined with the catalogue's true genres, scored, rendered.

Reads one night of the label job's Iceberg table (the snapshot its tag `night-<date>` names, or the table's
current one) and the catalogue, keeps the catalogue rows of a split, scores the model (F1 from the labels'
predicted `genres`, mAP@K from the `score_<genre>` columns) and the frequency prior on the same rows, and renders
report.md, report.json and the plots in memory: a bad input leaves nothing written. Rows that cannot be scored
(no label row, a status other than `ok`, no true genres) are counted, never dropped silently.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot

from genre_pipeline.config_fields import ISO_DATE, check_fields, option
from genre_pipeline.data import storage
from genre_pipeline.data.catalog import is_validation, read_catalog, validate_schema
from genre_pipeline.data.images import PreprocessSpec
from genre_pipeline.errors import JobInputError
from genre_pipeline.evaluate import plots
from genre_pipeline.evaluate.metrics import (
    MetricsReport,
    evaluate_scores,
    frequency_prior,
    metrics_line,
    prior_scores,
    summary_metrics,
)
from genre_pipeline.evaluate.tables import render_per_genre_table, render_summary_table, subset_lines
from genre_pipeline.genres import DEFAULT_THRESHOLD, GENRES, UnknownGenreError, column_name, encode_many
from genre_pipeline.label.contract import PARTITION_KEY
from genre_pipeline.label.table import (
    DEFAULT_TABLE,
    EMBEDDED_CATALOG,
    EMBEDDED_CATALOG_FILE,
    RUN_DATE_PROPERTY,
    NoNightError,
    TableSettings,
    catalog_properties,
    load_table,
    night_properties,
    night_snapshot,
    night_tag,
    nights,
)
from genre_pipeline.model.checkpoints import CheckpointError, read_meta
from genre_pipeline.model.signals import POSTER, subset_name
from genre_pipeline.statuses import STATUS_OK, STATUS_PARTIAL

logger = logging.getLogger(__name__)

ALL_SPLITS = "all"
TRAIN_SPLIT = "train"  # the prior's genre shares come from these catalogue rows
VALIDATION_SPLIT = "validation"
LABEL_COLUMNS = ("movie_id", "genres", "status")  # plus at least one score_<genre> column
OPTIONAL_LABEL_COLUMNS = ("signals",)  # absent in tables written before it existed
SCORED_STATUSES = (STATUS_OK, STATUS_PARTIAL)  # a fusion model's partial_signals rows are scored too
TRUE_GENRES, PREDICTED = "true_genres", "predicted_genres"


class EvaluationInputError(JobInputError, ValueError):
    """Labels or catalogue that cannot be evaluated; the message names the file, column or genre."""


@dataclass(frozen=True)
class EvaluateConfig:
    """The evaluation job's settings; each field's metadata is its flag in jobs/evaluate.py."""

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
class Night:
    """One night of the labels table: the columns evaluation needs, and which snapshot they are."""

    table: str
    run_date: str
    snapshot_id: int
    rows: pa.Table
    genres: list[str]  # the night's vocabulary, in GENRES order

    @property
    def source(self) -> str:
        return night_source(self.table, self.run_date, self.snapshot_id)


def night_source(table: str, run_date: str, snapshot_id: int) -> str:
    """What error messages about a night's rows name."""
    return f"{table} night {run_date} (snapshot {snapshot_id})"


@dataclass(frozen=True)
class EvalRows:
    """The split's rows that can be scored, as arrays in the labels' genre order, and what was left out."""

    y_true: np.ndarray
    scores: np.ndarray
    predicted: np.ndarray
    excluded: dict  # {"no_label_row": n, "status": {status: n}, "no_true_genres": n}
    signals: list[str] = field(default_factory=list)  # per row, what scored it ("poster+title")


def mark_validation_rows(catalog: pa.Table, val_fraction: float) -> pa.Table:
    """Relabel the train rows that training held out (the same stable hash of movie_id) as 'validation'."""
    held_out = [split == TRAIN_SPLIT and is_validation(movie_id, val_fraction)
                for movie_id, split in zip(catalog["movie_id"].to_pylist(), catalog["split"].to_pylist(), strict=True)]
    splits = pc.if_else(pa.array(held_out), VALIDATION_SPLIT, catalog["split"])
    return catalog.set_column(catalog.schema.get_field_index("split"), "split", splits)


def open_labels_table(config: EvaluateConfig) -> Table:
    """The label job's table. An embedded catalog is looked for before it is opened: opening one creates its
    SQLite file, and evaluation writes nothing into the labels folder."""
    settings = config.table_settings
    catalog_file = storage.join(settings.warehouse, EMBEDDED_CATALOG_FILE)
    if (settings.catalog == EMBEDDED_CATALOG and not storage.is_remote(settings.warehouse)
            and not storage.exists(catalog_file, settings.options)):
        raise NoNightError(f"{config.labels}: no labels table (no embedded catalog {EMBEDDED_CATALOG_FILE}): give "
                           "the label job's --output, and its --table-catalog if it used a named catalog")
    return load_table(settings)


def snapshot_run_date(table: Table, snapshot: Snapshot) -> str:
    """The night a snapshot holds: its tag's date, else the run date its summary records."""
    tagged = sorted(date for date, snapshot_id in nights(table).items() if snapshot_id == snapshot.snapshot_id)
    run_date = tagged[-1] if tagged else night_properties(snapshot).get(RUN_DATE_PROPERTY)
    if run_date is None:
        raise NoNightError(f"{'.'.join(table.name())}: the current snapshot {snapshot.snapshot_id} is not a night "
                           f"of the label job (no {night_tag('YYYY-MM-DD')} tag): give --run-date")
    return run_date


def label_genres(names: list[str]) -> list[str]:
    """The genres whose score column is present, in GENRES order."""
    return [genre for genre in GENRES if column_name(genre) in names]


def night_genres(rows: pa.Table) -> list[str]:
    """The night's vocabulary: the genres whose score column its scored rows fill. The table keeps the score
    columns of every model that wrote to it (schema evolution only adds columns), so an earlier model's genre
    can be a column that is null all night; a night without scored rows keeps every column's genre."""
    present = label_genres(rows.column_names)
    scored = rows.filter(pc.fill_null(pc.is_in(rows.column("status"), value_set=pa.array(SCORED_STATUSES)), False))
    filled = [genre for genre in present if scored.column(column_name(genre)).null_count < scored.num_rows]
    return filled or present


def read_night(config: EvaluateConfig) -> Night:
    """The night's label rows, after checking its schema has the columns evaluation needs and one row per movie."""
    table = open_labels_table(config)
    snapshot = night_snapshot(table, config.run_date)
    run_date = config.run_date or snapshot_run_date(table, snapshot)
    scan = table.scan(snapshot_id=snapshot.snapshot_id)  # projected on the schema the night was written with
    names = [column.name for column in scan.projection().fields]
    source = night_source(config.table, run_date, snapshot.snapshot_id)
    missing = [name for name in LABEL_COLUMNS if name not in names]
    if missing or not label_genres(names):
        missing = missing or ["score_<genre> (none of them)"]
        raise EvaluationInputError(f"{source}: labels missing required column(s) {missing}")
    optional = [name for name in OPTIONAL_LABEL_COLUMNS if name in names]
    rows = scan.select(*LABEL_COLUMNS, "model_version", *optional,
                       *(column_name(g) for g in label_genres(names))).to_arrow()
    ids = rows.column("movie_id")
    if len(pc.unique(ids)) != len(ids):
        raise EvaluationInputError(f"{source}: column 'movie_id' has duplicates; one row per movie expected")
    genres = night_genres(rows)
    rows = rows.select([*LABEL_COLUMNS, "model_version", *optional, *(column_name(g) for g in genres)])
    return Night(config.table, run_date, snapshot.snapshot_id, rows, genres)


def read_eval_catalog(config: EvaluateConfig) -> pa.Table:
    table = read_catalog(config.catalog, config.storage_options)
    required = ["movie_id", "genres"] + ([] if config.split == ALL_SPLITS else ["split"])
    validate_schema(table.schema, source=config.catalog, required=required)
    return table


def check_catalog_genres(catalog: pa.Table, genres: list[str], source: str) -> None:
    """Every true genre must be one the labels score, or the two sides do not describe the same task."""
    unknown = sorted(set(pc.unique(pc.list_flatten(catalog.column("genres"))).to_pylist()) - set(genres))
    if unknown:
        example = next(movie_id for movie_id, truth in zip(catalog.column("movie_id").to_pylist(),
                                                           catalog.column("genres").to_pylist(), strict=True)
                       if unknown[0] in (truth or ()))
        raise EvaluationInputError(
            f"{source}: column 'genres' holds genre(s) {unknown} (e.g. movie_id {example}) that the labels do not "
            f"score: their score columns cover {genres}"
        )


def select_split(catalog: pa.Table, split: str, source: str) -> pa.Table:
    if split == ALL_SPLITS:
        rows = catalog
    else:
        rows = catalog.filter(pc.fill_null(pc.equal(catalog.column("split"), split), False))
    if rows.num_rows == 0:
        has_split = "split" in catalog.column_names
        present = sorted(map(str, pc.unique(catalog.column("split")).to_pylist())) if has_split else []
        raise EvaluationInputError(f"{source}: no catalogue rows with split {split!r}; splits present: {present}")
    return rows


def join_labels(rows: pa.Table, labels: pa.Table) -> pa.Table:
    """The split's catalogue rows that have a label row: the label columns plus the catalogue's true genres."""
    position = pc.index_in(rows.column("movie_id"), value_set=labels.column("movie_id"))
    matched = labels.take(pc.drop_null(position))
    matched = matched.rename_columns([PREDICTED if name == "genres" else name for name in matched.column_names])
    return matched.append_column(TRUE_GENRES, rows.filter(pc.is_valid(position)).column("genres"))


def scorable_rows(joined: pa.Table) -> tuple[pa.Table, dict[str, int], int]:
    """Scored rows (status ok, or a fusion model's partial_signals) with at least one true genre; the others
    counted by status, and without truth."""
    scored_statuses = pa.array(SCORED_STATUSES)
    ok = pc.fill_null(pc.is_in(joined.column("status"), value_set=scored_statuses), False)  # null: not scored
    not_ok = joined.filter(pc.invert(ok)).column("status").to_pylist()
    by_status = {str(status): not_ok.count(status) for status in sorted(set(not_ok), key=str)}
    scored = joined.filter(ok)
    has_truth = pc.fill_null(pc.greater(pc.list_value_length(scored.column(TRUE_GENRES)), 0), False)
    kept = scored.filter(has_truth)
    return kept, by_status, scored.num_rows - kept.num_rows


def score_matrix(rows: pa.Table, genres: list[str], source: str) -> np.ndarray:
    columns = [column_name(genre) for genre in genres]
    for name in columns:
        if rows.column(name).null_count:
            movie_id = rows.filter(pc.is_null(rows.column(name))).column("movie_id")[0].as_py()
            raise EvaluationInputError(f"{source}: column {name!r} is null for movie_id {movie_id} whose status is ok")
    return np.column_stack([rows.column(name).to_numpy().astype(np.float64) for name in columns])


def eval_rows(split_rows: pa.Table, labels: pa.Table, genres: list[str], source: str) -> EvalRows:
    joined = join_labels(split_rows, labels)
    rows, by_status, no_truth = scorable_rows(joined)
    excluded = {"no_label_row": split_rows.num_rows - joined.num_rows, "status": by_status, "no_true_genres": no_truth}
    if rows.num_rows == 0:
        raise EvaluationInputError(f"{source}: none of the {split_rows.num_rows} catalogue rows of the split can be "
                                   f"scored; excluded: {excluded}")
    try:
        predicted = encode_many([g or [] for g in rows.column(PREDICTED).to_pylist()], genres)
    except UnknownGenreError as error:
        raise EvaluationInputError(f"{source}: column 'genres': {error}") from None
    y_true = encode_many(rows.column(TRUE_GENRES).to_pylist(), genres)
    return EvalRows(y_true=y_true, scores=score_matrix(rows, genres, source), predicted=predicted, excluded=excluded,
                    signals=row_signals(rows))


def row_signals(rows: pa.Table) -> list[str]:
    """What scored each row; labels written before the `signals` column came from posters alone."""
    if "signals" not in rows.column_names:
        return [POSTER] * rows.num_rows
    return [subset_name(used) if used else POSTER for used in rows.column("signals").to_pylist()]


def metrics_by_signals(rows: EvalRows) -> dict[str, dict]:
    """The summary metrics of each group of rows scored with the same signals (different movies per group)."""
    groups: dict[str, dict] = {}
    for name in sorted(set(rows.signals), key=lambda n: (n.count("+"), n)):
        keep = np.array([s == name for s in rows.signals])
        groups[name] = {"rows": int(keep.sum()), **summary_metrics(rows.y_true[keep], rows.scores[keep],
                                                                  rows.predicted[keep])}
    return groups


def train_truth(catalog: pa.Table, genres: list[str]) -> np.ndarray:
    """Multi-hot true genres of the catalogue's train rows that have any (the prior's population)."""
    if "split" not in catalog.column_names:
        return np.zeros((0, len(genres)), dtype=np.float32)
    train = catalog.filter(pc.fill_null(pc.equal(catalog.column("split"), TRAIN_SPLIT), False))
    return encode_many([truth for truth in train.column("genres").to_pylist() if truth], genres)


def prior_report(train_y: np.ndarray, rows: EvalRows, genres: list[str]) -> dict | None:
    """The frequency prior on the evaluated rows, at the study's threshold; None without train rows."""
    if len(train_y) == 0:
        logger.warning("no catalogue rows with split %r and true genres: no frequency prior", TRAIN_SPLIT)
        return None
    prior = frequency_prior(train_y)
    scores = prior_scores(prior, len(rows.y_true))
    metrics = evaluate_scores(rows.y_true, scores, scores >= DEFAULT_THRESHOLD, genres)
    return {"train_rows": len(train_y), "threshold": DEFAULT_THRESHOLD,
            "frequencies": dict(zip(genres, prior.tolist(), strict=True)), "metrics": metrics}


def model_card(config: EvaluateConfig, model_versions: list[str]) -> dict:
    """What made the labels, from the checkpoint's meta; refused when the labels came from another model."""
    try:
        meta = read_meta(config.model, config.storage_options)
    except CheckpointError as error:
        raise EvaluationInputError(str(error)) from None
    if meta.model_version not in model_versions:
        raise EvaluationInputError(f"--model {config.model} is {meta.model_version}, but the labels were written by "
                                   f"{', '.join(model_versions)}")
    return {"uri": config.model, "model_version": meta.model_version, "arch": meta.arch,
            "weights_source": meta.weights_source or {"kind": "not recorded"},
            "preprocess": meta.preprocess.to_dict(), "threshold_objective": meta.threshold_objective,
            "thresholds": dict(zip(meta.genres, meta.thresholds, strict=True)), "epoch": meta.epoch,
            "recipe": meta.recipe, "validation_metrics": meta.metrics, "signals": meta.signals,
            "pooled_blocks": meta.pooled_blocks, **({"fusion": fusion_card(meta.fusion)} if meta.is_fusion else {})}


def fusion_card(fusion: dict) -> dict:
    """What the report shows of a fusion model: its tables' versions and its per-subset validation table."""
    return {"embeddings": {signal: {key: table[key] for key in ("version", "space", "method", "dim")}
                           for signal, table in fusion.get("embeddings", {}).items()},
            "subset_metrics": fusion.get("subset_metrics", {}), "validation_rows": fusion.get("validation_rows", 0)}


def features_line(pooled_blocks: list[int]) -> str:
    stages = f" and of stages {', '.join(map(str, pooled_blocks))}" if pooled_blocks else ""
    return f"the backbone's mean+max pooled output of its last convolution{stages}"


def render_model_card(card: dict) -> list[str]:
    details = {key: value for key, value in card["weights_source"].items() if key != "kind"}
    source = card["weights_source"]["kind"] + "".join(f", {key} {value}" for key, value in sorted(details.items()))
    spec = PreprocessSpec.from_dict(card["preprocess"])
    thresholds = sorted(set(card["thresholds"].values()))
    recipe = ", ".join(f"{key}={value}" for key, value in card["recipe"].items()) or "not recorded"
    return [
        "## Model", "",
        f"- `{card['model_version']}` from `{card['uri']}`: arch `{card['arch']}`, epoch {card['epoch']}",
        f"- initial weights: {source}",
        f"- preprocessing: {spec.describe()}",
        f"- features: {features_line(card.get('pooled_blocks', []))}",
        f"- thresholds: tuned for {card['threshold_objective']}-F1 on validation "
        f"({'one threshold, ' + str(thresholds[0]) if len(thresholds) == 1 else 'per genre'})",
        f"- recipe: {recipe}",
        f"- validation at that epoch: {metrics_line(card['validation_metrics'])}", "",
        *fusion_lines(card),
    ]


def fusion_lines(card: dict) -> list[str]:
    if "fusion" not in card:
        return []
    fusion = card["fusion"]
    tables = [f"- {signal} embeddings: version {t['version']} ({t['method']}, {t['dim']} dims)"
              for signal, t in sorted(fusion["embeddings"].items())]
    return [f"- signals: {', '.join(card['signals'])}", *tables, "",
            *subset_lines(fusion["subset_metrics"], fusion["validation_rows"])]


def status_text(by_status: dict[str, int]) -> str:
    return ", ".join(f"{count} {status}" for status, count in by_status.items()) or "0"


def render_markdown(report: dict, model: MetricsReport, prior: dict | None) -> str:
    rows, excluded, labels = report["rows"], report["rows"]["excluded"], report["labels"]
    table_rows = {"model": model.summary(), **({"frequency prior": prior["metrics"].summary()} if prior else {})}
    return "\n".join([
        f"# Genre labels vs catalogue: split {report['split']!r}, night {report['run_date']}",
        "",
        f"Labels: table `{labels['table']}` (catalog `{labels['catalog']}`), night {report['run_date']} "
        f"(snapshot {labels['snapshot_id']}; model {', '.join(report['model_versions'])}); "
        f"catalogue `{report['catalog']}`.",
        "",
        f"{rows['in_split']} catalogue rows in the split, {rows['evaluated']} evaluated. Not evaluated: "
        f"{excluded['no_label_row']} without a label row, {status_text(excluded['status'])} by label status, "
        f"{excluded['no_true_genres']} without true genres.",
        "",
        *(render_model_card(report["model"]["card"]) if report["model"].get("card") else []),
        "## Summary",
        "",
        render_summary_table(table_rows),
        "",
        "The frequency prior scores every movie with the genre shares of the train split; its F1 uses threshold "
        f"{DEFAULT_THRESHOLD}." if prior else "No train rows with genres: no frequency prior.",
        "",
        "## Per genre (model)",
        "",
        render_per_genre_table(model.per_genre),
        "",
        f"Mean AP over the genres with positives: {model.mean_average_precision:.4f}.",
        "",
        *signal_group_lines(report["by_signals"]),
    ])


def signal_group_lines(groups: dict[str, dict]) -> list[str]:
    """The model's rows by the signals that scored them, when more than posters did."""
    if set(groups) <= {"poster"}:
        return []
    rows = {f"{name} ({values['rows']} movies)": values for name, values in groups.items()}
    return ["## By the signals that scored each movie", "", render_summary_table(rows), "",
            "Each row is the movies scored with those signals (a different set of movies per row; the model card "
            "compares subsets on the same movies).", ""]


def figures(train_y: np.ndarray, rows: EvalRows, model: MetricsReport, split: str,
            genres: list[str]) -> dict[str, bytes]:
    return plots.report_figures(train_y.sum(axis=0), rows.y_true.sum(axis=0), model.per_genre, genres=genres,
                                split_names=(TRAIN_SPLIT, f"{split} (evaluated)"))


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


def evaluate(config: EvaluateConfig) -> tuple[str, dict[str, bytes]]:
    """Read, check, score, render: everything in memory, so that a bad input leaves nothing written."""
    night = read_night(config)
    labels, genres = night.rows, night.genres
    catalog = read_eval_catalog(config)
    if config.val_fraction is not None:
        catalog = mark_validation_rows(catalog, config.val_fraction)
    check_catalog_genres(catalog, genres, config.catalog)
    split_rows = select_split(catalog, config.split, config.catalog)
    rows = eval_rows(split_rows, labels, genres, night.source)
    train_y = train_truth(catalog, genres)
    model = evaluate_scores(rows.y_true, rows.scores, rows.predicted, genres)
    prior = prior_report(train_y, rows, genres)
    model_versions = sorted(map(str, pc.unique(labels.column("model_version")).to_pylist()))
    card = model_card(config, model_versions) if config.model else None
    report = {
        "labels": {"table": night.table, "catalog": config.table_catalog, "warehouse": config.labels,
                   "snapshot_id": night.snapshot_id},
        "run_date": night.run_date, "catalog": config.catalog, "split": config.split,
        "model_versions": model_versions,
        "genres": genres,
        "rows": {"in_split": split_rows.num_rows, "evaluated": len(rows.y_true), "excluded": rows.excluded},
        "model": {**model.to_dict(), **({"card": card} if card else {})},
        "by_signals": metrics_by_signals(rows),
        "frequency_prior": {**prior, "metrics": prior["metrics"].to_dict()} if prior else None,
    }
    out = config.out or storage.join("evaluation", f"{PARTITION_KEY}={night.run_date}", f"split={config.split}")
    files = {"report.md": render_markdown(report, model, prior).encode(),
             "report.json": json.dumps(report, indent=2, allow_nan=False).encode()}
    return out, {**files, **figures(train_y, rows, model, config.split, genres)}
