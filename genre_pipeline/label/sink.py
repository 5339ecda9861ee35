"""Writing a night's label rows as the labels table's data files, from Ray Data's workers.

Each write task writes its rows as Parquet data files of the table and returns only their metadata and the
counts the night's checks need (`NightCounts`): no row passes through the driver, which commits afterwards.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.io.pyarrow import _dataframe_to_data_files
from pyiceberg.manifest import DataFile
from pyiceberg.table import Table
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import Datasink, WriteResult

from genre_pipeline.label.origins import IN_PREVIOUS_COLUMN, ORIGIN_COLUMN
from genre_pipeline.model.signals import POSTER

# Rows per write task's block (Ray Data bundles the scored blocks up to it), and so per data file: few enough
# files for cheap scan planning; more per task would make Ray Data hold the night's blocks for one task at the
# end (docs/performance.md).
WRITE_BLOCK_ROWS = 50_000


@dataclass
class NightCounts:
    """What the driver checks before it commits a night, summed over the write tasks."""

    rows: int = 0
    by_status: Counter = field(default_factory=Counter)
    by_origin: Counter = field(default_factory=Counter)
    attempted: int = 0  # rows the model should have scored with their signals (a poster, or any for fusion)
    failed_by_status: Counter = field(default_factory=Counter)  # of those, the rows scored without them
    first_error: str | None = None
    in_previous: int = 0

    @property
    def failed(self) -> int:
        return sum(self.failed_by_status.values())

    def add(self, other: NightCounts) -> None:
        self.rows += other.rows
        self.by_status.update(other.by_status)
        self.by_origin.update(other.by_origin)
        self.attempted += other.attempted
        self.failed_by_status.update(other.failed_by_status)
        self.first_error = self.first_error or other.first_error
        self.in_previous += other.in_previous


def count_rows(table: pa.Table, *, model_signals: tuple[str, ...]) -> NightCounts:
    """A block's counts. A row with a poster_uri scored without its poster failed (for a model of posters), and
    so did a fusion model's row scored with no signal at all."""
    uses_poster, fusion = POSTER in model_signals, set(model_signals) != {POSTER}
    has_poster = pc.is_valid(table.column("poster_uri")).to_pylist()
    statuses, errors = table.column("status").to_pylist(), table.column("error").to_pylist()
    counts = NightCounts(rows=table.num_rows, by_status=Counter(statuses),
                         by_origin=Counter(table.column(ORIGIN_COLUMN).to_pylist()),
                         in_previous=sum(table.column(IN_PREVIOUS_COLUMN).to_pylist()))
    for row, used in enumerate(table.column("signals").to_pylist()):
        used = used or []
        poster_failed = uses_poster and has_poster[row] and POSTER not in used
        counts.attempted += (uses_poster and has_poster[row]) or fusion
        if poster_failed or (fusion and not used):
            counts.failed_by_status[statuses[row]] += 1
            counts.first_error = counts.first_error or errors[row]
    return counts


@dataclass
class BlockWrite:
    data_files: list[DataFile]
    counts: NightCounts


class LabelsTableSink(Datasink[BlockWrite]):
    """Write tasks put data files in the table's location; `result` holds them and the counts once done."""

    def __init__(self, table: Table, schema: pa.Schema, *, model_signals: tuple[str, ...]) -> None:
        self.table_metadata = table.metadata
        self.io = table.io
        self.schema = schema
        self.model_signals = model_signals
        self.write_id = uuid.uuid4()
        self.data_files: list[DataFile] = []
        self.counts = NightCounts()

    @property
    def min_rows_per_write(self) -> int:
        return WRITE_BLOCK_ROWS

    def get_name(self) -> str:
        return "LabelsTable"

    def write(self, blocks: Iterable[Block], ctx) -> BlockWrite:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [table for table in tables if table.num_rows]
        if not tables:
            return BlockWrite([], NightCounts())
        rows = pa.concat_tables(tables, promote_options="permissive")
        counts = count_rows(rows, model_signals=self.model_signals)
        rows = rows.select(self.schema.names).cast(self.schema)
        # One id per task: a retried task writes files of the same names, not orphans beside them.
        write_uuid = uuid.uuid5(self.write_id, str(ctx.task_idx))
        files = list(_dataframe_to_data_files(table_metadata=self.table_metadata, df=rows, io=self.io,
                                              write_uuid=write_uuid))
        return BlockWrite(files, counts)

    def on_write_complete(self, write_result: WriteResult[BlockWrite]) -> None:
        for written in write_result.write_returns:
            self.data_files.extend(written.data_files)
            self.counts.add(written.counts)
