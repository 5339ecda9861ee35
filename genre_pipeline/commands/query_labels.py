"""Query the labels table with SQL (DuckDB), as a warehouse would.

    python jobs/query_labels.py --labels out/labels --query latest --limit 10
    python jobs/query_labels.py --labels out/labels --query "SELECT status, count(*) FROM labels GROUP BY 1"

`--query` is one of the documented queries (latest, per_genre, signals, changed) or any SQL over the views
`labels` (the latest night) and `previous_labels` (the night before it).
"""

from __future__ import annotations

import argparse

from genre_pipeline.label.table import DEFAULT_TABLE, EMBEDDED_CATALOG, TableSettings
from genre_pipeline.label.warehouse import QUERIES, run_query


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", required=True, help="the label job's --output (the warehouse folder)")
    p.add_argument("--table-catalog", default=EMBEDDED_CATALOG, help="the label job's --table-catalog")
    p.add_argument("--table", default=DEFAULT_TABLE, help="the label job's --table")
    p.add_argument("--query", default="latest", help=f"one of {sorted(QUERIES)} or SQL over the view `labels`")
    p.add_argument("--limit", type=int, default=20, help="rows to print")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    table = run_query(TableSettings(args.labels, args.table_catalog, args.table), args.query)
    print(QUERIES.get(args.query, args.query).strip())
    print(table.slice(0, args.limit).to_pandas().to_string(index=False, max_colwidth=60))
    print(f"({table.num_rows} rows)")
    return 0

