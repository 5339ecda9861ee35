"""The evaluation report: a night's labels joined with the catalogue's true genres, scored, rendered.

Reads `<labels>/run_date=<date>/*.parquet` and the catalogue, keeps the catalogue rows of a split, scores the model
(F1 from the labels' predicted `genres`, mAP@K from the `score_<genre>` columns) and the frequency prior on the
same rows, and renders report.md, report.json and the plots in memory: a bad input leaves nothing written. Rows
that cannot be scored (no label row, a status other than `ok`, no true genres) are counted, never dropped silently.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

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
from genre_pipeline.jobs_cli import flag
from genre_pipeline.label.contract import PARTITION_KEY
from genre_pipeline.model.checkpoints import CheckpointError, read_meta
from genre_pipeline.model.fusion import POSTER, subset_name
from genre_pipeline.statuses import STATUS_OK, STATUS_PARTIAL

logger = logging.getLogger(__name__)

ALL_SPLITS = "all"
TRAIN_SPLIT = "train"  # the prior's genre shares come from these catalogue rows
VALIDATION_SPLIT = "validation"
LABEL_COLUMNS = ("movie_id", "genres", "status")  # plus at least one score_<genre> column
OPTIONAL_LABEL_COLUMNS = ("signals",)  # absent in nights written before it existed
PARTITION_DIR = re.compile(rf"^{PARTITION_KEY}=(\d{{4}}-\d{{2}}-\d{{2}})$")
TRUE_GENRES, PREDICTED = "true_genres", "predicted_genres"


class EvaluationInputError(JobInputError, ValueError):
    """Labels or catalogue that cannot be evaluated; the message names the file, column or genre."""


def run_date_arg(text: str) -> str:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not YYYY-MM-DD")
    return text


@dataclass(frozen=True)
class EvaluateConfig:
    """The evaluation job's settings; each field's metadata is its flag in jobs/evaluate.py."""

    labels: str = field(metadata=flag("labels root with run_date=YYYY-MM-DD/*.parquet (local or s3://)"))
    catalog: str = field(metadata=flag("catalogue Parquet file or directory (local or s3://)"))
    split: str = field(default="test", metadata=flag(f"catalogue split to evaluate; '{ALL_SPLITS}' for every row"))
    run_date: str | None = field(default=None, metadata=flag(
        "labels partition YYYY-MM-DD; default: the latest present", type=run_date_arg))
    out: str | None = field(default=None, metadata=flag(
        "output directory (local or s3://); default: evaluation/run_date=<date>/split=<split>"))
    val_fraction: float | None = field(default=None, metadata=flag(
        f"the training job's --val-fraction: its held-out train rows become split '{VALIDATION_SPLIT}' (evaluate "
        f"with --split {VALIDATION_SPLIT}); the prior then comes from the remaining train rows"))
    model: str | None = field(default=None, metadata=flag(
        "the checkpoint that wrote these labels (local or s3://): the report then shows its backbone, initial "
        "weights, preprocessing, thresholds and recipe"))
    storage_options: storage.StorageOptions = storage.StorageOptions()  # the storage flags'


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


def partition_dates(labels: str, options: storage.StorageOptions) -> list[str]:
    """The run dates present under the labels root, oldest first (ISO dates sort as strings)."""
    fs, root = storage.arrow_filesystem(labels, options)
    entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    matches = (PARTITION_DIR.match(e.base_name) for e in entries if e.type == pafs.FileType.Directory)
    return sorted(m.group(1) for m in matches if m)


def resolve_run_date(config: EvaluateConfig) -> str:
    dates = partition_dates(config.labels, config.storage_options)
    if not dates:
        raise EvaluationInputError(f"{config.labels}: no {PARTITION_KEY}=YYYY-MM-DD partitions")
    if config.run_date is None:
        return dates[-1]
    if config.run_date not in dates:
        raise EvaluationInputError(f"{config.labels}: no partition {PARTITION_KEY}={config.run_date}; has {dates}")
    return config.run_date


def label_genres(schema: pa.Schema) -> list[str]:
    """The labels' vocabulary: the genres whose score column is present, in GENRES order."""
    return [genre for genre in GENRES if column_name(genre) in schema.names]


def read_labels(partition: str, options: storage.StorageOptions) -> tuple[pa.Table, list[str]]:
    """Every file of the partition, after checking each one has the columns evaluation needs."""
    fs, path = storage.arrow_filesystem(partition, options)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    if not dataset.files:
        raise EvaluationInputError(f"{partition}: no Parquet files in the partition")
    for fragment in dataset.get_fragments():
        schema = fragment.physical_schema
        missing = [name for name in LABEL_COLUMNS if name not in schema.names]
        if missing or not label_genres(schema):
            missing = missing or ["score_<genre> (none of them)"]
            raise EvaluationInputError(f"{fragment.path}: labels file missing required column(s) {missing}")
    genres = label_genres(dataset.schema)
    optional = [name for name in OPTIONAL_LABEL_COLUMNS if name in dataset.schema.names]
    table = dataset.to_table(columns=[*LABEL_COLUMNS, "model_version", *optional, *(column_name(g) for g in genres)])
    ids = table.column("movie_id")
    if len(pc.unique(ids)) != len(ids):
        raise EvaluationInputError(f"{partition}: column 'movie_id' has duplicates; one row per movie expected")
    return table, genres


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
    scored_statuses = pa.array([STATUS_OK, STATUS_PARTIAL])
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
    rows, excluded = report["rows"], report["rows"]["excluded"]
    table_rows = {"model": model.summary(), **({"frequency prior": prior["metrics"].summary()} if prior else {})}
    return "\n".join([
        f"# Genre labels vs catalogue: split {report['split']!r}, {PARTITION_KEY}={report['run_date']}",
        "",
        f"Labels `{report['labels_partition']}` (model {', '.join(report['model_versions'])}), "
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
    prefix), before the evaluation's work."""
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
    run_date = resolve_run_date(config)
    partition = storage.join(config.labels, f"{PARTITION_KEY}={run_date}")
    labels, genres = read_labels(partition, config.storage_options)
    catalog = read_eval_catalog(config)
    if config.val_fraction is not None:
        catalog = mark_validation_rows(catalog, config.val_fraction)
    check_catalog_genres(catalog, genres, config.catalog)
    split_rows = select_split(catalog, config.split, config.catalog)
    rows = eval_rows(split_rows, labels, genres, partition)
    train_y = train_truth(catalog, genres)
    model = evaluate_scores(rows.y_true, rows.scores, rows.predicted, genres)
    prior = prior_report(train_y, rows, genres)
    model_versions = sorted(map(str, pc.unique(labels.column("model_version")).to_pylist()))
    card = model_card(config, model_versions) if config.model else None
    report = {
        "labels_partition": partition, "run_date": run_date, "catalog": config.catalog, "split": config.split,
        "model_versions": model_versions,
        "genres": genres,
        "rows": {"in_split": split_rows.num_rows, "evaluated": len(rows.y_true), "excluded": rows.excluded},
        "model": {**model.to_dict(), **({"card": card} if card else {})},
        "by_signals": metrics_by_signals(rows),
        "frequency_prior": {**prior, "metrics": prior["metrics"].to_dict()} if prior else None,
    }
    out = config.out or storage.join("evaluation", f"{PARTITION_KEY}={run_date}", f"split={config.split}")
    files = {"report.md": render_markdown(report, model, prior).encode(),
             "report.json": json.dumps(report, indent=2, allow_nan=False).encode()}
    return out, {**files, **figures(train_y, rows, model, config.split, genres)}
