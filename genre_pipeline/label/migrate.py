"""Moving the nights of the Hive-partitioned layout (`<root>/run_date=YYYY-MM-DD/*.parquet`, what the label job
wrote before the labels table) into the labels table, one snapshot per night.

Each `run_date=` folder becomes one night, in date order: every Parquet file in it, its rows with their original
values (`labelled_at`, `run_id`, `model_version`, scores...), committed by `table.commit_night` as an overwrite
snapshot tagged `night-<date>` whose summary records the run id(s), model version(s), row counts by status, the
movies the night dropped, and the folder it came from. Columns a night's files lack (`signals` in the oldest
nights, `input_key` in all of them) are null; a column the table does not have, or a missing required one, is
refused rather than lost. A night whose files repeat a movie_id (or lack one) is refused, naming the file.
Every night to migrate is checked so before the first is committed: a bad file leaves the table as it was.

What is safe, and so what the migration does:

- Nights the table already has (a tag `night-<date>`) are skipped: a re-run, or a run after a partial one,
  migrates nothing twice.
- A night older than the table's latest night is refused (`OlderNightError`, exit 2) before anything is
  committed. Each commit replaces the table's current rows, so committing it would make an old night the one
  readers see and the one the next label night carries rows from. Migrate before the first label night of the
  table (or into another `--table`); the nights newer than the table's latest migrate normally.
- Each commit is conditioned on the snapshot the night started from, so a label run that commits meanwhile
  makes the migration stop with `NightChangedError` (exit 2) rather than overwrite it; a re-run resumes with
  the nights still missing (or refuses them, if that label night is newer).

`input_key` stays null in migrated rows: no digest of their inputs was recorded, so the next label night scores
every migrated movie again (a full night), and carries rows over from then on.

Memory: one night at a time, and within it one batch of at most `WRITE_BLOCK_ROWS` rows (plus the night's
movie ids, for the duplicate check); each batch is written as data files of the table through pyiceberg.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyiceberg.io.pyarrow import _dataframe_to_data_files
from pyiceberg.manifest import DataFile
from pyiceberg.table import Table

from genre_pipeline.config_fields import check_fields, option
from genre_pipeline.data import storage
from genre_pipeline.errors import JobInputError
from genre_pipeline.label.contract import PARTITION_KEY, labels_schema
from genre_pipeline.label.night import PROPERTY_PREFIX
from genre_pipeline.label.sink import WRITE_BLOCK_ROWS
from genre_pipeline.label.table import (
    DEFAULT_TABLE,
    EMBEDDED_CATALOG,
    RUN_DATE_PROPERTY,
    NoNightError,
    TableSettings,
    commit_night,
    load_table,
    nights,
    open_table,
)

logger = logging.getLogger(__name__)

NIGHT_FOLDER_PREFIX = f"{PARTITION_KEY}="
SCORE_PREFIX = "score_"  # the genre score columns: a night keeps the vocabulary its model had
MIGRATED_FROM_PROPERTY = PROPERTY_PREFIX + "migrated-from"


class MigrationError(JobInputError, ValueError):
    """Old labels that cannot be migrated as they are (no nights, duplicate or null ids, unknown columns)."""


class OlderNightError(JobInputError, RuntimeError):
    """A night older than the table's latest: committing it would make it the table's current night."""


@dataclass(frozen=True)
class MigrateConfig:
    """The migration's settings; each field's metadata is its flag in jobs/migrate_labels.py."""

    source: str = field(metadata=option(
        "the old labels root (local or s3://) holding run_date=YYYY-MM-DD/ folders of Parquet files",
        name="--from"))
    output: str = field(metadata=option("the label job's --output (the labels warehouse folder)"))
    table_catalog: str = field(default=EMBEDDED_CATALOG, metadata=option(
        f"the label job's --table-catalog: '{EMBEDDED_CATALOG}' (SQLite beside a local --output) or a catalog "
        "configured in PYICEBERG_CATALOG__<NAME>__* variables or ~/.pyiceberg.yaml"))
    table: str = field(default=DEFAULT_TABLE, metadata=option("the label job's --table, namespace.name"))
    storage_options: storage.StorageOptions = field(default_factory=storage.StorageOptions)  # the storage flags'

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def table_settings(self) -> TableSettings:
        return TableSettings(self.output, self.table_catalog, self.table, self.storage_options)


@dataclass(frozen=True)
class HiveNight:
    run_date: str
    uri: str  # the run_date= folder
    files: tuple[str, ...]  # its Parquet files, as paths of the source's Arrow filesystem


@dataclass(frozen=True)
class MigratedNight:
    run_date: str
    snapshot_id: int
    rows: int


@dataclass(frozen=True)
class MigrationSummary:
    table: str
    migrated: list[MigratedNight]
    skipped: list[str]  # run dates the table already had


@dataclass
class NightTally:
    """What the night's snapshot summary records, summed over its batches."""

    rows: int = 0
    by_status: Counter = field(default_factory=Counter)
    run_ids: set = field(default_factory=set)
    model_versions: set = field(default_factory=set)

    def add(self, rows: pa.Table) -> None:
        self.rows += rows.num_rows
        self.by_status.update(rows.column("status").to_pylist())
        self.run_ids.update(pc.unique(rows.column("run_id")).to_pylist())
        self.model_versions.update(pc.unique(rows.column("model_version")).to_pylist())


def is_iso_date(text: str) -> bool:
    try:
        return date.fromisoformat(text).isoformat() == text
    except ValueError:
        return False


def hive_nights(source: str, options: storage.StorageOptions) -> tuple[pafs.FileSystem, list[HiveNight]]:
    """The source's nights in date order, each with its Parquet files (hidden and `_` files skipped)."""
    fs, root = storage.arrow_filesystem(source, options)
    with storage.reporting_errors(source, "list the old labels"):
        entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    found = []
    for entry in sorted(entries, key=lambda e: e.base_name):
        if entry.type != pafs.FileType.Directory or not entry.base_name.startswith(NIGHT_FOLDER_PREFIX):
            continue
        uri = storage.join(source, entry.base_name)
        run_date = entry.base_name.removeprefix(NIGHT_FOLDER_PREFIX)
        if not is_iso_date(run_date):
            raise MigrationError(f"{uri}: not a night's folder ({PARTITION_KEY}=YYYY-MM-DD); nothing migrated")
        with storage.reporting_errors(uri, "list the night's files"):
            listed = fs.get_file_info(pafs.FileSelector(entry.path))
        files = tuple(sorted(f.path for f in listed if f.is_file and f.base_name.endswith(".parquet")
                             and not f.base_name.startswith((".", "_"))))
        if not files:
            raise MigrationError(f"{uri}: no Parquet file in this night's folder; nothing migrated")
        found.append(HiveNight(run_date, uri, files))
    if not found:
        raise MigrationError(f"{source}: no {PARTITION_KEY}=YYYY-MM-DD folders of Parquet files to migrate")
    return fs, found


def committed_nights(settings: TableSettings) -> dict[str, int]:
    """The table's nights (run date -> snapshot id); none when there is no table yet."""
    try:
        return nights(load_table(settings))
    except NoNightError:
        return {}


def nights_to_migrate(found: list[HiveNight], committed: Mapping[str, int],
                      table: str) -> tuple[list[HiveNight], list[str]]:
    """The nights to commit, in date order, and those the table already has; refuses older nights."""
    skipped = [night.run_date for night in found if night.run_date in committed]
    todo = [night for night in found if night.run_date not in committed]
    latest = max(committed, default=None)
    older = [night.run_date for night in todo if latest is not None and night.run_date < latest]
    if older:
        raise OlderNightError(
            f"{table}: its latest night is {latest}, and the nights {', '.join(older)} to migrate are older. "
            "Each night replaces the table's current rows, so committing them would make an old night the one "
            "readers see and the next label night starts from: nothing migrated. Migrate into another --table, "
            "or from a root holding only the nights after the table's latest.")
    return todo, skipped


def night_schema(fs: pafs.FileSystem, night: HiveNight) -> pa.Schema:
    """The labels schema with the night's genre score columns; refuses files that lack a required column or
    hold one the table does not have (its values would be lost)."""
    contract = labels_schema()
    scores: list[str] = []
    for path in night.files:
        with fs.open_input_file(path) as file:
            schema = pq.ParquetFile(file).schema_arrow
        missing = [f.name for f in contract if not f.nullable and f.name not in schema.names]
        unknown = [name for name in schema.names if name not in contract.names and name != PARTITION_KEY
                   and not name.startswith(SCORE_PREFIX)]
        if missing or unknown:
            raise MigrationError(f"{path}: night {night.run_date} "
                                 + (f"lacks the required columns {missing}" if missing else "")
                                 + (" and " if missing and unknown else "")
                                 + (f"has columns the labels table does not: {unknown}" if unknown else "")
                                 + "; nothing migrated")
        scores += [name for name in schema.names if name.startswith(SCORE_PREFIX) and name not in scores]
    fields = [f for f in contract if not f.name.startswith(SCORE_PREFIX)]
    at = fields.index(contract.field("poster_uri")) + 1  # where the contract puts the scores
    return pa.schema(fields[:at] + [pa.field(name, pa.float32()) for name in scores] + fields[at:])


def check_movie_ids(fs: pafs.FileSystem, night: HiveNight) -> np.ndarray:
    """The night's movie ids, once each is known to be set and unique across all the night's files."""
    seen: list[tuple[str, np.ndarray]] = []
    for path in night.files:
        with fs.open_input_file(path) as file:
            column = pq.read_table(file, columns=["movie_id"]).column("movie_id")
        if column.null_count:
            raise MigrationError(f"{path}: {column.null_count} rows of night {night.run_date} have no movie_id; "
                                 "nothing migrated")
        ids = column.to_numpy().astype(np.int64)
        values, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise MigrationError(f"{path}: movie_id {values[counts > 1][0]} appears {counts[counts > 1][0]} times "
                                 f"in night {night.run_date}; nothing migrated")
        for other, other_ids in seen:
            repeated = ids[np.isin(ids, other_ids)]
            if len(repeated):
                raise MigrationError(f"{path}: movie_id {repeated[0]} of night {night.run_date} is also in "
                                     f"{other}; nothing migrated")
        seen.append((path, ids))
    return np.concatenate([ids for _, ids in seen])


def conform(batch: pa.RecordBatch, schema: pa.Schema, path: str) -> pa.Table:
    """A batch of old rows as rows of `schema`: missing nullable columns null, values unchanged."""
    rows = pa.Table.from_batches([batch])
    columns = [rows.column(f.name) if f.name in rows.column_names else pa.nulls(rows.num_rows, f.type)
               for f in schema]
    try:
        return pa.Table.from_arrays(columns, names=schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
        raise MigrationError(f"{path}: rows that do not fit the labels schema ({error}); nothing migrated") from None


def night_batches(fs: pafs.FileSystem, night: HiveNight, schema: pa.Schema) -> Iterator[pa.Table]:
    for path in night.files:
        with fs.open_input_file(path) as file:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=WRITE_BLOCK_ROWS):
                yield conform(batch, schema, path)


def write_night(table: Table, fs: pafs.FileSystem, night: HiveNight,
                schema: pa.Schema) -> tuple[list[DataFile], NightTally]:
    """The night's rows as data files of the table, batch by batch."""
    data_files: list[DataFile] = []
    tally = NightTally()
    try:
        for rows in night_batches(fs, night, schema):
            tally.add(rows)
            data_files += _dataframe_to_data_files(table_metadata=table.metadata, df=rows, io=table.io)
    except Exception:
        discard(table, data_files)
        raise
    return data_files, tally


def discard(table: Table, data_files: list[DataFile]) -> None:
    """Delete the data files of a night that is not committed."""
    for data_file in data_files:
        try:
            table.io.delete(data_file.file_path)
        except OSError as error:
            logger.warning("could not delete %s: %s", data_file.file_path, error)


def night_summary(night: HiveNight, tally: NightTally, removed: int) -> dict[str, str]:
    """The snapshot summary of a migrated night: the label job's keys that the old rows can tell."""
    properties = {"run-id": ",".join(sorted(tally.run_ids)),
                  "model-version": ",".join(sorted(tally.model_versions)), "rows": tally.rows, "removed": removed,
                  **{f"status.{status}": count for status, count in sorted(tally.by_status.items())}}
    return {MIGRATED_FROM_PROPERTY: night.uri, **{PROPERTY_PREFIX + k: str(v) for k, v in properties.items()}}


def removed_movies(table: Table, night_ids: np.ndarray) -> int:
    """Movies of the table's current night that this night does not have."""
    base = table.current_snapshot()
    if base is None:
        return 0
    previous = table.scan(snapshot_id=base.snapshot_id, selected_fields=("movie_id",)).to_arrow()
    return int((~np.isin(previous.column("movie_id").to_numpy(), night_ids)).sum())


def check_night(fs: pafs.FileSystem, night: HiveNight) -> pa.Schema:
    """The night's schema, once its files are known to fit the table and hold each movie once."""
    schema = night_schema(fs, night)
    if not len(check_movie_ids(fs, night)):
        raise MigrationError(f"{night.uri}: the night has no rows; an empty night is never committed")
    return schema


def migrate_night(settings: TableSettings, fs: pafs.FileSystem, night: HiveNight,
                  schema: pa.Schema) -> MigratedNight:
    """Write the night's data files and commit them as one snapshot over the table's current one."""
    table = open_table(settings, schema)  # created, or evolved to the night's score columns
    base = table.current_snapshot()  # the commit happens only if the table is still at this snapshot
    base_date = base.summary.additional_properties.get(RUN_DATE_PROPERTY) if base and base.summary else None
    if base_date is not None and base_date >= night.run_date:  # a label night committed since the plan was made
        raise OlderNightError(f"{settings.identifier}: night {base_date} was committed meanwhile; night "
                              f"{night.run_date} is not newer: not migrated")
    removed = removed_movies(table, check_movie_ids(fs, night))
    data_files, tally = write_night(table, fs, night, schema)
    try:
        snapshot_id = commit_night(table, base, data_files, night.run_date, night_summary(night, tally, removed))
    except JobInputError:
        discard(table, data_files)
        raise
    logger.info("migrated night %s (%d rows) from %s: snapshot %d", night.run_date, tally.rows, night.uri,
                snapshot_id)
    return MigratedNight(night.run_date, snapshot_id, tally.rows)


def migrate_labels(config: MigrateConfig) -> MigrationSummary:
    """Commit each night of the old layout that the table does not have yet, oldest first. Every such night is
    checked before the first is committed, so a bad file stops the migration before it changes the table."""
    fs, found = hive_nights(config.source, config.storage_options)
    todo, skipped = nights_to_migrate(found, committed_nights(config.table_settings), config.table)
    if skipped:
        logger.info("the table already has nights %s: skipped", ", ".join(skipped))
    schemas = [check_night(fs, night) for night in todo]
    migrated = [migrate_night(config.table_settings, fs, night, schema)
                for night, schema in zip(todo, schemas, strict=True)]
    return MigrationSummary(config.table, migrated, skipped)
