"""The labels as an Apache Iceberg table: its catalog, its schema, and committing a night as one snapshot.

The table holds the catalogue's current labels, one row per movie. Each night replaces them in one atomic
snapshot (an overwrite of every data file) whose summary records the night, and a tag `night-YYYY-MM-DD` names
it: readers see the old night or the new one, and any earlier night stays readable by its tag (time travel).
Ray Data's workers write the data files; the driver commits only their metadata.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pyarrow as pa
import ray
from pyiceberg.catalog import Catalog
from pyiceberg.catalog import load_catalog as load_named_catalog
from pyiceberg.exceptions import CommitFailedException, NoSuchTableError, ValidationException
from pyiceberg.manifest import DataFile
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot
from pyiceberg.table.update.snapshot import ManageSnapshots

from genre_pipeline import failpoints
from genre_pipeline.data import storage
from genre_pipeline.errors import JobInputError

logger = logging.getLogger(__name__)

DEFAULT_TABLE = "genre_pipeline.labels"
EMBEDDED_CATALOG = "embedded"
EMBEDDED_CATALOG_FILE = "catalog.db"
NIGHT_TAG_PREFIX = "night-"
RUN_DATE_PROPERTY = "genre-pipeline.run-date"
TABLE_PROPERTIES = {
    "format-version": "2",
    "write.parquet.compression-codec": "zstd",
}


class TableSettingsError(JobInputError, ValueError):
    """A catalog or table setting that cannot work (e.g. the embedded catalog with an s3:// output)."""


class NightChangedError(JobInputError, RuntimeError):
    """Another run committed to the table while this one ran; this run committed nothing."""


class NoNightError(JobInputError, LookupError):
    """The table has no committed night of that date (or no night at all)."""


@dataclass(frozen=True)
class TableSettings:
    """Where the labels table lives: its catalog, its name, and the folder its files go to when it is created."""

    warehouse: str  # local folder or s3://bucket/prefix: the embedded catalog and new tables' files live here
    catalog: str = EMBEDDED_CATALOG  # or the name of a pyiceberg catalog configured in its env vars / yaml
    identifier: str = DEFAULT_TABLE
    options: storage.StorageOptions = storage.StorageOptions()

    @property
    def table_location(self) -> str:
        return storage.join(self.warehouse, *self.identifier.split("."))

    @property
    def staging(self) -> str:
        """Scored rows of nights not yet committed (what a killed night resumes from); no reader looks here."""
        return storage.join(self.warehouse, ".staging", self.identifier)


def file_io_properties(options: storage.StorageOptions) -> dict[str, str]:
    """pyiceberg's FileIO settings for our storage options; credentials still come from the AWS chain."""
    properties = {}
    endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        properties["s3.endpoint"] = endpoint
    # Without a region pyiceberg asks AWS itself where the bucket lives, even for another endpoint's bucket.
    region = options.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region or endpoint:
        properties["s3.region"] = region or "us-east-1"
    if options.anonymous:
        properties["s3.anonymous"] = "true"
    return properties


def catalog_properties(settings: TableSettings) -> dict[str, str]:
    """The catalog's name and properties, as pyiceberg's `load_catalog` (and Ray Data's Iceberg reader) take
    them: the embedded SQLite catalog beside a local warehouse folder, or a catalog configured by name (REST,
    Glue, SQL on Postgres...) in `PYICEBERG_CATALOG__<NAME>__*` variables or `~/.pyiceberg.yaml`."""
    io = file_io_properties(settings.options)
    if settings.catalog != EMBEDDED_CATALOG:
        return {"name": settings.catalog, **io}
    if storage.is_remote(settings.warehouse):
        raise TableSettingsError(
            f"{settings.warehouse}: the embedded SQLite catalog needs a local output folder; for an s3:// output "
            "give --table-catalog NAME, a catalog shared by every run (REST, Glue, SQL on Postgres) configured in "
            "PYICEBERG_CATALOG__<NAME>__* variables")
    folder = os.path.abspath(storage.fsspec_filesystem(settings.warehouse)[1])
    return {"name": EMBEDDED_CATALOG, "type": "sql", "uri": f"sqlite:///{folder}/{EMBEDDED_CATALOG_FILE}",
            "warehouse": f"file://{folder}", **io}


def load_catalog(settings: TableSettings) -> Catalog:
    ensure_working_directory()
    properties = catalog_properties(settings)
    name = properties.pop("name")
    if settings.catalog == EMBEDDED_CATALOG:
        os.makedirs(properties["warehouse"].removeprefix("file://"), exist_ok=True)
    try:
        return load_named_catalog(name, **properties)
    except (ValueError, OSError) as error:
        raise TableSettingsError(f"Iceberg catalog {name!r}: {error} (configure it with "
                                 f"PYICEBERG_CATALOG__{name.upper().replace('-', '_')}__TYPE and __URI)") from None


def ensure_working_directory() -> None:
    """pyiceberg looks for its .pyiceberg.yaml in the working directory; a `ray job submit` driver can find its
    working directory removed under it (the job's unpacked --working-dir), which would fail every catalog load."""
    try:
        os.getcwd()
    except FileNotFoundError:
        os.chdir(tempfile.gettempdir())


def read_snapshot(settings: TableSettings, snapshot: Snapshot) -> ray.data.Dataset:
    """One snapshot's rows as a Ray dataset: Ray Data's tasks read the data files, not the driver."""
    properties = catalog_properties(settings)
    return ray.data.read_iceberg(table_identifier=settings.identifier, catalog_kwargs=properties,
                                 snapshot_id=snapshot.snapshot_id)


def open_table(settings: TableSettings, schema: pa.Schema) -> Table:
    """The labels table, created on first use and evolved to carry every column of `schema` (new columns are
    added; old ones stay, null in new nights)."""
    catalog = load_catalog(settings)
    namespace = settings.identifier.rsplit(".", 1)[0]
    catalog.create_namespace_if_not_exists(namespace)
    table = catalog.create_table_if_not_exists(settings.identifier, schema=schema,
                                               location=table_location(settings), properties=TABLE_PROPERTIES)
    missing = [name for name in schema.names if name not in {f.name for f in table.schema().fields}]
    if missing:
        with table.update_schema() as update:
            update.union_by_name(schema)
        logger.info("added columns %s to %s", missing, settings.identifier)
    return table


def table_location(settings: TableSettings) -> str:
    if storage.is_remote(settings.table_location):
        return settings.table_location
    return "file://" + os.path.abspath(storage.fsspec_filesystem(settings.table_location)[1])


def load_table(settings: TableSettings) -> Table:
    """The existing labels table; NoNightError when there is none yet."""
    try:
        return load_catalog(settings).load_table(settings.identifier)
    except NoSuchTableError:
        raise NoNightError(f"{settings.identifier}: no labels table in catalog {settings.catalog!r} "
                           f"(warehouse {settings.warehouse}): run jobs/label_catalog.py first") from None


def night_tag(run_date: str) -> str:
    return f"{NIGHT_TAG_PREFIX}{run_date}"


def nights(table: Table) -> dict[str, int]:
    """Run date -> the snapshot id of that night's committed labels, from the table's night tags."""
    return {name.removeprefix(NIGHT_TAG_PREFIX): ref.snapshot_id for name, ref in table.refs().items()
            if name.startswith(NIGHT_TAG_PREFIX)}


def night_snapshot(table: Table, run_date: str | None = None) -> Snapshot:
    """The snapshot of the night `run_date`, or the table's current one."""
    if run_date is None:
        snapshot = table.current_snapshot()
        if snapshot is None:
            raise NoNightError(f"{'.'.join(table.name())}: no night committed yet")
        return snapshot
    known = nights(table)
    if run_date not in known:
        raise NoNightError(f"{'.'.join(table.name())}: no night {run_date}; nights: {sorted(known) or 'none'}")
    return table.snapshot_by_id(known[run_date])


def night_properties(snapshot: Snapshot | None) -> dict[str, str]:
    """What a night's snapshot summary records (run date, run id, model, row counts)."""
    if snapshot is None or snapshot.summary is None:
        return {}
    return {key: value for key, value in snapshot.summary.additional_properties.items()
            if key.startswith("genre-pipeline.")}


def committed_rows(snapshot: Snapshot | None) -> int:
    if snapshot is None or snapshot.summary is None:
        return 0
    return int(snapshot.summary.additional_properties.get("total-records", 0))


def commit_night(table: Table, base: Snapshot | None, data_files: Iterable[DataFile], run_date: str,
                 properties: Mapping[str, str]) -> int:
    """Replace every row of snapshot `base` by `data_files` in one snapshot tagged with the night; its id.

    The commit requires the table to still be at `base`: a run that committed meanwhile makes this one fail with
    NightChangedError (its rows were computed from `base`, so re-applying them on top would undo that run).
    """
    failpoints.reached("commit.start")
    transaction = table.transaction()
    summary = {RUN_DATE_PROPERTY: run_date, **properties}
    with transaction.update_snapshot(snapshot_properties=summary).overwrite() as snapshot:
        if base is not None:
            for task in table.scan(snapshot_id=base.snapshot_id).plan_files():
                snapshot.delete_data_file(task.file)
        for data_file in data_files:
            snapshot.append_data_file(data_file)
    snapshot_id = transaction.table_metadata.current_snapshot().snapshot_id
    with ManageSnapshots(transaction) as refs:
        refs.create_tag(snapshot_id, night_tag(run_date))
    failpoints.reached("commit.metadata_written")
    try:
        transaction.commit_transaction()
    except (CommitFailedException, ValidationException) as error:
        raise NightChangedError(
            f"{'.'.join(table.name())}: another run committed while run {properties.get('genre-pipeline.run-id')} "
            f"ran (it started from snapshot {base.snapshot_id if base else 'none'}): nothing committed ({error}). "
            "Check the table's latest night, then re-run if needed.") from None
    if nights(table).get(run_date) != snapshot_id:  # a retry rebased on a metadata-only commit drops the tag
        table.manage_snapshots().create_tag(snapshot_id, night_tag(run_date)).commit()
    failpoints.reached("commit.done")
    return snapshot_id
