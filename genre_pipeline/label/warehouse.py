"""The documented warehouse queries over the labels table, run with DuckDB (tests, the demo,
`jobs/query_labels.py`) on Arrow scans of the table's snapshots.

Two views: `labels`, the latest night (with its `run_date`), and `previous_labels`, the night before it (empty
when there is none). A warehouse engine with Iceberg support runs the same SQL on the table itself: the latest
night is the table, an earlier one is `FOR VERSION AS OF 'night-YYYY-MM-DD'` (docs/operations.md).
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
from pyiceberg.table import Table

from genre_pipeline.label.contract import PARTITION_KEY
from genre_pipeline.label.table import RUN_DATE_PROPERTY, NoNightError, TableSettings, load_table, nights

QUERIES = {
    # Every movie's label on the latest night.
    "latest": """
        SELECT movie_id, title, genres, top_genre, signals, status, run_date, model_version
        FROM labels
        ORDER BY movie_id""",
    # How many movies carry each predicted genre on the latest night.
    "per_genre": """
        SELECT genre, count(*) AS movies
        FROM (SELECT unnest(genres) AS genre FROM labels)
        GROUP BY genre ORDER BY movies DESC, genre""",
    # What the latest night's labels were made from: movies per set of signals and status.
    "signals": """
        SELECT array_to_string(signals, '+') AS signals, status, count(*) AS movies
        FROM labels
        GROUP BY ALL ORDER BY movies DESC, signals, status""",
    # Movies whose predicted genres differ between the two latest nights.
    "changed": """
        SELECT b.movie_id, b.title, a.genres AS before, b.genres AS after
        FROM previous_labels a JOIN labels b USING (movie_id)
        WHERE a.genres IS DISTINCT FROM b.genres
        ORDER BY b.movie_id""",
}


def night_rows(table: Table, run_date: str, snapshot_id: int) -> pa.Table:
    rows = table.scan(snapshot_id=snapshot_id).to_arrow()
    return rows.append_column(PARTITION_KEY, pa.array([run_date] * rows.num_rows, pa.string()).cast(pa.date32()))


def latest_nights(table: Table) -> list[tuple[str, int]]:
    """(run date, snapshot id) of the two latest nights: the current snapshot's, and the last tagged before it."""
    current = table.current_snapshot()
    if current is None:
        return []
    run_date = current.summary.additional_properties.get(RUN_DATE_PROPERTY) if current.summary else None
    earlier = sorted((date, snapshot) for date, snapshot in nights(table).items()
                     if run_date is None or date < run_date)
    return [(run_date, current.snapshot_id), *earlier[-1:]]


def connect(settings: TableSettings) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views `labels` (latest night) and `previous_labels` (the one before)."""
    table = load_table(settings)
    found = latest_nights(table)
    if not found:
        raise NoNightError(f"{settings.identifier}: no night committed yet")
    latest = night_rows(table, *found[0])
    previous = night_rows(table, *found[1]) if len(found) > 1 else latest.schema.empty_table()
    connection = duckdb.connect()
    for view, rows in (("labels", latest), ("previous_labels", previous)):
        connection.register(f"{view}_arrow", rows)
        connection.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM {view}_arrow")
    return connection


def run_query(settings: TableSettings, name_or_sql: str) -> pa.Table:
    sql = QUERIES.get(name_or_sql, name_or_sql)
    return connect(settings).sql(sql).to_arrow_table()
