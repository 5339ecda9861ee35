"""A night's labels joined with the catalogue's true genres and scored: the model (F1 from the labels' predicted
`genres`, mAP@K from the `score_<genre>` columns), the model by the signals that scored each movie, and the
frequency prior on the same rows. Rows that cannot be scored (no label row, a status other than `ok`, no true
genres) are counted, never dropped silently."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from genre_pipeline.data import storage
from genre_pipeline.data.catalog import is_validation, read_catalog, validate_schema
from genre_pipeline.evaluate.metrics import (
    MetricsReport,
    evaluate_scores,
    frequency_prior,
    prior_scores,
    summary_metrics,
)
from genre_pipeline.evaluate.night_labels import SCORED_STATUSES, EvaluationInputError
from genre_pipeline.genres import DEFAULT_THRESHOLD, UnknownGenreError, column_name, encode_many
from genre_pipeline.model.signals import POSTER, subset_name

logger = logging.getLogger(__name__)

ALL_SPLITS = "all"
TRAIN_SPLIT = "train"  # the prior's genre shares come from these catalogue rows
VALIDATION_SPLIT = "validation"
TRUE_GENRES, PREDICTED = "true_genres", "predicted_genres"


@dataclass(frozen=True)
class Excluded:
    """The split's rows that were not scored, by reason."""

    no_label_row: int
    status: dict[str, int]  # rows by a label status other than the scored ones
    no_true_genres: int


@dataclass(frozen=True)
class ScoredRows:
    """The split's rows that can be scored, as arrays in the labels' genre order, and what was left out."""

    y_true: np.ndarray
    scores: np.ndarray
    predicted: np.ndarray
    excluded: Excluded
    signals: list[str]  # per row, what scored it ("poster+title")


@dataclass(frozen=True)
class SignalGroup:
    """The model's summary metrics on the movies scored with the same signals."""

    rows: int
    metrics: dict[str, float]

    def to_json(self) -> dict:
        return {"rows": self.rows, **self.metrics}


@dataclass(frozen=True)
class PriorResult:
    """The frequency prior (genre shares of the train rows) scored on the evaluated rows at one threshold."""

    train_rows: int
    threshold: float
    frequencies: dict[str, float]
    metrics: MetricsReport

    def to_json(self) -> dict:
        return {"train_rows": self.train_rows, "threshold": self.threshold, "frequencies": self.frequencies,
                "metrics": self.metrics.to_dict()}


def read_truth_catalog(uri: str, split: str, options: storage.StorageOptions) -> pa.Table:
    """The catalogue, with the columns evaluating `split` needs."""
    table = read_catalog(uri, options)
    required = ["movie_id", "genres"] + ([] if split == ALL_SPLITS else ["split"])
    validate_schema(table.schema, source=uri, required=required)
    return table


def mark_validation_rows(catalog: pa.Table, val_fraction: float) -> pa.Table:
    """Relabel the train rows that training held out (the same stable hash of movie_id) as 'validation'."""
    held_out = [split == TRAIN_SPLIT and is_validation(movie_id, val_fraction)
                for movie_id, split in zip(catalog["movie_id"].to_pylist(), catalog["split"].to_pylist(), strict=True)]
    splits = pc.if_else(pa.array(held_out), VALIDATION_SPLIT, catalog["split"])
    return catalog.set_column(catalog.schema.get_field_index("split"), "split", splits)


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


def scored_rows(split_rows: pa.Table, labels: pa.Table, genres: list[str], source: str) -> ScoredRows:
    """The split's catalogue rows joined with their label rows, as arrays; refused when none can be scored."""
    joined = join_labels(split_rows, labels)
    rows, by_status, no_truth = scorable_rows(joined)
    excluded = Excluded(no_label_row=split_rows.num_rows - joined.num_rows, status=by_status,
                        no_true_genres=no_truth)
    if rows.num_rows == 0:
        raise EvaluationInputError(f"{source}: none of the {split_rows.num_rows} catalogue rows of the split can be "
                                   f"scored; excluded: {asdict(excluded)}")
    try:
        predicted = encode_many([g or [] for g in rows.column(PREDICTED).to_pylist()], genres)
    except UnknownGenreError as error:
        raise EvaluationInputError(f"{source}: column 'genres': {error}") from None
    y_true = encode_many(rows.column(TRUE_GENRES).to_pylist(), genres)
    return ScoredRows(y_true=y_true, scores=score_matrix(rows, genres, source), predicted=predicted,
                      excluded=excluded, signals=row_signals(rows))


def row_signals(rows: pa.Table) -> list[str]:
    """What scored each row; labels written before the `signals` column came from posters alone."""
    if "signals" not in rows.column_names:
        return [POSTER] * rows.num_rows
    return [subset_name(used) if used else POSTER for used in rows.column("signals").to_pylist()]


def metrics_by_signals(rows: ScoredRows) -> dict[str, SignalGroup]:
    """The summary metrics of each group of rows scored with the same signals (different movies per group)."""
    groups: dict[str, SignalGroup] = {}
    for name in sorted(set(rows.signals), key=lambda n: (n.count("+"), n)):
        keep = np.array([s == name for s in rows.signals])
        groups[name] = SignalGroup(int(keep.sum()), summary_metrics(rows.y_true[keep], rows.scores[keep],
                                                                    rows.predicted[keep]))
    return groups


def train_truth(catalog: pa.Table, genres: list[str]) -> np.ndarray:
    """Multi-hot true genres of the catalogue's train rows that have any (the prior's population)."""
    if "split" not in catalog.column_names:
        return np.zeros((0, len(genres)), dtype=np.float32)
    train = catalog.filter(pc.fill_null(pc.equal(catalog.column("split"), TRAIN_SPLIT), False))
    return encode_many([truth for truth in train.column("genres").to_pylist() if truth], genres)


def score_prior(train_y: np.ndarray, rows: ScoredRows, genres: list[str]) -> PriorResult | None:
    """The frequency prior on the evaluated rows, at the study's threshold; None without train rows."""
    if len(train_y) == 0:
        logger.warning("no catalogue rows with split %r and true genres: no frequency prior", TRAIN_SPLIT)
        return None
    prior = frequency_prior(train_y)
    scores = prior_scores(prior, len(rows.y_true))
    metrics = evaluate_scores(rows.y_true, scores, scores >= DEFAULT_THRESHOLD, genres)
    return PriorResult(train_rows=len(train_y), threshold=DEFAULT_THRESHOLD,
                       frequencies=dict(zip(genres, prior.tolist(), strict=True)), metrics=metrics)
