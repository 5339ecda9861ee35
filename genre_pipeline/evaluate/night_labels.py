"""One night of the label job's Iceberg table, as evaluation reads it: the snapshot its tag `night-<date>` names (or
the table's current one), checked to hold the columns evaluation needs and one row per movie."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot

from genre_pipeline.data import storage
from genre_pipeline.errors import JobInputError
from genre_pipeline.genres import GENRES, column_name
from genre_pipeline.label.table import (
    EMBEDDED_CATALOG,
    EMBEDDED_CATALOG_FILE,
    RUN_DATE_PROPERTY,
    NoNightError,
    TableSettings,
    load_table,
    night_properties,
    night_snapshot,
    night_tag,
    nights,
)
from genre_pipeline.statuses import STATUS_OK, STATUS_PARTIAL

LABEL_COLUMNS = ("movie_id", "genres", "status")  # plus at least one score_<genre> column
OPTIONAL_LABEL_COLUMNS = ("signals",)  # absent in tables written before it existed
SCORED_STATUSES = (STATUS_OK, STATUS_PARTIAL)  # a fusion model's partial_signals rows are scored too


class EvaluationInputError(JobInputError, ValueError):
    """Labels or catalogue that cannot be evaluated; the message names the file, column or genre."""


@dataclass(frozen=True)
class NightLabels:
    """One night of the labels table: the columns evaluation needs, and which snapshot they are."""

    table: str
    run_date: str
    snapshot_id: int
    rows: pa.Table
    genres: list[str]  # the night's vocabulary, in GENRES order

    @property
    def source(self) -> str:
        return night_source(self.table, self.run_date, self.snapshot_id)

    @property
    def model_versions(self) -> list[str]:
        return sorted(map(str, pc.unique(self.rows.column("model_version")).to_pylist()))


def night_source(table: str, run_date: str, snapshot_id: int) -> str:
    """What error messages about a night's rows name."""
    return f"{table} night {run_date} (snapshot {snapshot_id})"


def open_labels_table(settings: TableSettings) -> Table:
    """The label job's table. An embedded catalog is looked for before it is opened: opening one creates its
    SQLite file, and evaluation writes nothing into the labels folder."""
    catalog_file = storage.join(settings.warehouse, EMBEDDED_CATALOG_FILE)
    if (settings.catalog == EMBEDDED_CATALOG and not storage.is_remote(settings.warehouse)
            and not storage.exists(catalog_file, settings.options)):
        raise NoNightError(f"{settings.warehouse}: no labels table (no embedded catalog {EMBEDDED_CATALOG_FILE}): "
                           "give the label job's --output, and its --table-catalog if it used a named catalog")
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


def read_night_labels(settings: TableSettings, run_date: str | None = None) -> NightLabels:
    """The label rows of the night `run_date` (default: the table's current snapshot), after checking its schema
    has the columns evaluation needs and one row per movie."""
    table = open_labels_table(settings)
    snapshot = night_snapshot(table, run_date)
    run_date = run_date or snapshot_run_date(table, snapshot)
    scan = table.scan(snapshot_id=snapshot.snapshot_id)  # projected on the schema the night was written with
    names = [column.name for column in scan.projection().fields]
    source = night_source(settings.identifier, run_date, snapshot.snapshot_id)
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
    return NightLabels(settings.identifier, run_date, snapshot.snapshot_id, rows, genres)
