"""The documented warehouse queries over the labels, run with DuckDB (tests, the demo, `jobs/query_labels.py`).

Nights written before a column existed (e.g. `signals`) read it as NULL (`union_by_name`). The same SQL runs on
Athena/Trino/Hive over the external table in the README; `{labels}` is the
Hive-partitioned labels root (`<root>/run_date=YYYY-MM-DD/*.parquet`).
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from genre_pipeline.data import storage

LABELS_VIEW = """
CREATE OR REPLACE VIEW labels AS
SELECT * FROM read_parquet('{glob}', hive_partitioning = true, hive_types = {{'run_date': DATE}},
                           union_by_name = true)
"""

QUERIES = {
    # The newest label of every movie, whichever night last labelled it.
    "latest": """
        SELECT movie_id, title, genres, top_genre, signals, status, run_date, model_version
        FROM labels
        QUALIFY row_number() OVER (PARTITION BY movie_id ORDER BY run_date DESC) = 1
        ORDER BY movie_id""",
    # How many movies carry each predicted genre on the newest night.
    "per_genre": """
        SELECT genre, count(*) AS movies
        FROM (SELECT unnest(genres) AS genre FROM labels WHERE run_date = (SELECT max(run_date) FROM labels))
        GROUP BY genre ORDER BY movies DESC, genre""",
    # What the newest night's labels were made from: movies per set of signals and status.
    "signals": """
        SELECT array_to_string(signals, '+') AS signals, status, count(*) AS movies
        FROM labels WHERE run_date = (SELECT max(run_date) FROM labels)
        GROUP BY ALL ORDER BY movies DESC, signals, status""",
    # Movies whose predicted genres differ between the two newest nights.
    "changed": """
        WITH nights AS (SELECT DISTINCT run_date FROM labels ORDER BY run_date DESC LIMIT 2),
             a AS (SELECT * FROM labels WHERE run_date = (SELECT min(run_date) FROM nights)),
             b AS (SELECT * FROM labels WHERE run_date = (SELECT max(run_date) FROM nights))
        SELECT b.movie_id, b.title, a.genres AS before, b.genres AS after
        FROM a JOIN b USING (movie_id)
        WHERE a.genres IS DISTINCT FROM b.genres
        ORDER BY b.movie_id""",
}


def connect(labels_root: str) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with a `labels` view over every committed night (staging is never matched)."""
    if storage.is_remote(labels_root):
        raise ValueError(f"{labels_root}: query s3:// labels from your warehouse, or copy them locally")
    connection = duckdb.connect()
    glob = storage.join(labels_root, "run_date=*", "*.parquet")
    connection.execute(LABELS_VIEW.format(glob=glob.replace("'", "''")))
    return connection


def run_query(labels_root: str, name_or_sql: str) -> pa.Table:
    sql = QUERIES.get(name_or_sql, name_or_sql)
    return connect(labels_root).sql(sql).to_arrow_table()
