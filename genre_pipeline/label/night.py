"""One night of the label job: pin the model, score what changed, check the night, commit it as one snapshot.

Nothing per movie lives on the driver: the catalogue is counted and checked for duplicate ids in Ray Data, the
label rows go from the actors to the write tasks, and the driver receives data files' metadata and counts.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot

from genre_pipeline import failpoints
from genre_pipeline.cuda_guard import check_gpu_workers
from genre_pipeline.errors import JobInputError
from genre_pipeline.label import incremental
from genre_pipeline.label.catalog_ids import count_catalog
from genre_pipeline.label.contract import labels_schema
from genre_pipeline.label.origins import ORIGIN_CARRIED, ORIGIN_RESUMED, ORIGIN_SCORED
from genre_pipeline.label.pipeline import (
    KnownRows,
    LabelConfig,
    actors_started_in_time,
    build_label_dataset,
    check_storage,
    resolve_actor_resources,
    signal_tables,
)
from genre_pipeline.label.sink import LabelsTableSink, NightCounts
from genre_pipeline.label.sizing import join_partitions
from genre_pipeline.label.table import RUN_DATE_PROPERTY, commit_night, committed_rows, open_table, read_snapshot
from genre_pipeline.label.table import night_properties as night_properties_of
from genre_pipeline.model.checkpoints import pin_model

logger = logging.getLogger(__name__)

PROPERTY_PREFIX = "genre-pipeline."


class FailedNightError(JobInputError, RuntimeError):
    """Too many posters failed for the night to be published; nothing was committed."""


class ShrinkingNightError(JobInputError, RuntimeError):
    """The night would drop too many of the previous night's movies; nothing was committed."""


class NightOrderError(JobInputError, ValueError):
    """A night older than the table's latest: committing it would turn the table's current labels back."""


class IncompleteNightError(JobInputError, RuntimeError):
    """The written night does not hold every catalogue row exactly once; nothing was committed."""


@dataclass(frozen=True)
class LabelSummary:
    table: str  # the labels table's identifier
    snapshot_id: int
    run_id: str
    model_version: str
    rows_by_status: dict[str, int]
    rows_by_origin: dict[str, int]  # scored, resumed, carried
    removed: int  # movies of the previous night that left the catalogue
    setup_seconds: float  # pinning, counting, opening the table: paid by every night, whatever changed
    seconds: float

    @property
    def rows(self) -> int:
        return sum(self.rows_by_status.values())

    @property
    def scored(self) -> int:
        return self.rows_by_origin.get(ORIGIN_SCORED, 0)

    @property
    def posters_per_second(self) -> float:
        """Rows scored tonight per second of the whole run."""
        return self.scored / self.seconds if self.seconds else 0.0


def check_night(counts: NightCounts, expected_rows: int, previous_rows: int, config: LabelConfig) -> None:
    """Refuse a night that is incomplete, whose posters mostly failed, or that drops too many movies."""
    if counts.rows != expected_rows:
        raise IncompleteNightError(f"{config.table}: the night holds {counts.rows} rows, the catalogue "
                                   f"{expected_rows}; nothing committed")
    if counts.attempted and counts.failed / counts.attempted > config.max_failed_fraction:
        failed = dict(sorted(counts.failed_by_status.items()))
        raise FailedNightError(
            f"{counts.failed} of {counts.attempted} movies failed ({failed}; first error: {counts.first_error}), "
            f"more than --max-failed-fraction {config.max_failed_fraction:g}: a systemic fault (credentials, "
            "endpoint, poster roots?). Nothing committed; the table keeps its last night.")
    removed = previous_rows - counts.in_previous
    if previous_rows and removed / previous_rows > config.max_shrink_fraction and not config.allow_shrink:
        raise ShrinkingNightError(
            f"{config.catalog}: the night would drop {removed} of the previous night's {previous_rows} movies, "
            f"more than --max-shrink-fraction {config.max_shrink_fraction:g} (a truncated catalogue?). Nothing "
            "committed; re-run with --allow-shrink if the catalogue really lost them.")


def night_properties(run_id: str, model_version: str, counts: NightCounts, removed: int) -> dict[str, str]:
    """What the night's snapshot summary records beside Iceberg's own counts."""
    properties = {"run-id": run_id, "model-version": model_version, "rows": counts.rows, "removed": removed,
                  **{f"rows-{origin}": counts.by_origin.get(origin, 0)
                     for origin in (ORIGIN_SCORED, ORIGIN_RESUMED, ORIGIN_CARRIED)},
                  **{f"status.{status}": count for status, count in sorted(counts.by_status.items())}}
    return {PROPERTY_PREFIX + key: str(value) for key, value in properties.items()}


def discard(table: Table, sink: LabelsTableSink) -> None:
    """Delete the data files of a night that is not committed (a killed run leaves them to orphan clean-up)."""
    for data_file in sink.data_files:
        try:
            table.io.delete(data_file.file_path)
        except OSError as error:
            logger.warning("could not delete %s: %s", data_file.file_path, error)


def check_night_order(run_date: str, base: Snapshot | None) -> None:
    latest = night_properties_of(base).get(RUN_DATE_PROPERTY)
    if latest and run_date < latest:
        raise NightOrderError(f"night {run_date} is older than the table's latest night {latest}: the table holds "
                              "the current labels; read an earlier night by its tag night-<date>")


def known_rows(config: LabelConfig, base: Snapshot | None, rows: int) -> KnownRows:
    previous = read_snapshot(config.table_settings, base) if base is not None else None
    staged = None if config.full else incremental.staged_rows(config.staging, config.storage_options,
                                                              join_partitions(rows))
    return KnownRows(previous, staged)


def label_catalog(config: LabelConfig) -> LabelSummary:
    """Label the catalogue's changed rows, carry the others over, and commit the night; nothing is committed
    on failure. The model is resolved and its digest checked once, here: every actor loads that exact model."""
    started = time.monotonic()
    check_storage(config)
    model = pin_model(config.model, config.storage_options)  # fails before any work when unusable or tampered
    failpoints.reached("model.pinned")
    tables = signal_tables(config, model.meta)
    rows = count_catalog(config.catalog, config.storage_options)
    resources = resolve_actor_resources(config, rows)  # a pool that could never run fails before any work
    if config.on_gpu:  # a node whose driver cannot run the image's CUDA fails here, not at the first batch
        check_gpu_workers(config.start_timeout)
    schema = labels_schema(model.meta.genres)
    table = open_table(config.table_settings, schema)
    base = table.current_snapshot()  # the commit happens only if the table is still at this snapshot
    check_night_order(config.run_date, base)
    run_id = f"{config.run_date}-{uuid.uuid4().hex[:8]}"
    setup_seconds = time.monotonic() - started  # what every night pays before its rows are read
    labels = build_label_dataset(config, model, resources, run_id=run_id, labelled_at=datetime.now(timezone.utc),
                                 night_digest=incremental.night_inputs_digest(model, tables),
                                 known=known_rows(config, base, rows), tables=tables, rows=rows)
    sink = LabelsTableSink(table, schema, model_signals=tuple(model.meta.signals))
    with actors_started_in_time(config, resources):  # a pool that cannot start fails within --start-timeout
        labels.write_datasink(sink)
    failpoints.reached("commit.files_written")
    previous_rows = committed_rows(base)
    removed = previous_rows - sink.counts.in_previous
    try:
        check_night(sink.counts, rows, previous_rows, config)
        snapshot_id = commit_night(table, base, sink.data_files, config.run_date,
                                   night_properties(run_id, model.meta.model_version, sink.counts, removed))
    except JobInputError:
        discard(table, sink)
        raise
    incremental.remove_staging(config.staging, config.storage_options)
    return LabelSummary(config.table, snapshot_id, run_id, model.meta.model_version, dict(sink.counts.by_status),
                        dict(sink.counts.by_origin), removed, setup_seconds, time.monotonic() - started)

