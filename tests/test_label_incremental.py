"""label/incremental.py without Ray: input keys, which rows are reused and from where, and the rows kept."""

from __future__ import annotations

import os

import pyarrow as pa

from genre_pipeline.data.storage import StorageOptions
from genre_pipeline.label.contract import INPUT_KEY, labels_schema
from genre_pipeline.label.incremental import (
    PREVIOUS,
    STAGED,
    add_input_keys,
    kept_label_rows,
    known_label_rows,
    reuse_origins,
    rows_to_score,
)

NIGHT = "digest-of-model-and-tables"


def keys_of(uris: list, titles: list, night: str = NIGHT) -> list:
    block = pa.table({"poster_uri": pa.array(uris, pa.string()), "title": titles})
    return add_input_keys(block, night_digest=night, options=StorageOptions()).column(INPUT_KEY).to_pylist()


def test_a_key_changes_with_the_poster_the_title_and_the_night(tmp_path):
    poster = tmp_path / "1.jpg"
    poster.write_bytes(b"jpeg")
    first = keys_of([str(poster), None, str(tmp_path / "gone.jpg")], ["A", "B", "C"])
    assert len(set(first)) == 3 and all(len(key) == 32 for key in first)
    assert keys_of([str(poster), None, str(tmp_path / "gone.jpg")], ["A", "B", "C"]) == first  # stable
    assert keys_of([str(poster)], ["A renamed"])[0] != first[0]
    assert keys_of([str(poster)], ["A"], night="another model")[0] != first[0]
    stat = poster.stat()
    poster.write_bytes(b"JPEG")  # same size: the modification time tells
    os.utime(poster, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert keys_of([str(poster)], ["A"])[0] != first[0]
    (tmp_path / "gone.jpg").write_bytes(b"appeared")
    assert keys_of([str(tmp_path / "gone.jpg")], ["C"])[0] != first[2]


def joined(keys: list, previous: list, previous_status: list, staged: list | None = None) -> pa.Table:
    columns = {"movie_id": list(range(len(keys))), INPUT_KEY: pa.array(keys, pa.string()),
               PREVIOUS + INPUT_KEY: pa.array(previous, pa.string()),
               PREVIOUS + "status": pa.array(previous_status, pa.string())}
    if staged is not None:
        columns[STAGED + INPUT_KEY] = pa.array(staged, pa.string())
        columns[STAGED + "status"] = pa.array(["ok" if key else None for key in staged], pa.string())
    return pa.table(columns)


def test_rows_are_reused_only_with_the_same_key_and_a_final_status():
    block = joined(keys=["a", "b", "c", "d", "e", None],
                   previous=["a", "x", None, "d", "e", None],
                   previous_status=["ok", "ok", None, "fetch_failed", "inference_failed", None])
    assert reuse_origins(block, reuse=True).tolist() == ["carried", None, None, None, None, None]
    assert reuse_origins(block, reuse=False).tolist() == [None] * 6


def test_this_nights_staged_rows_win_over_the_previous_night():
    block = joined(keys=["a", "b", "c"], previous=["a", "b", None], previous_status=["ok", "ok", None],
                   staged=["a", None, "c"])
    assert reuse_origins(block, reuse=True).tolist() == ["resumed", "carried", "resumed"]


def test_a_block_splits_into_the_rows_to_score_and_the_rows_kept_with_their_origin():
    schema = labels_schema()
    previous = pa.Table.from_pylist(
        [{name: None for name in schema.names} | {"movie_id": i, "status": status, "model_version": "m",
                                                  "run_id": "old", "labelled_at": 0, INPUT_KEY: key}
         for i, (status, key) in enumerate([("ok", "a"), ("ok", "x"), ("ok", "c"), ("fetch_failed", "d")])],
        schema=schema)
    block = pa.table({"movie_id": [0, 1, 2, 3], INPUT_KEY: ["a", "b", "c", "d"],
                      **{PREVIOUS + name: previous.column(name) for name in schema.names if name != "movie_id"}})
    assert rows_to_score(block, reuse=True)["movie_id"].to_pylist() == [1, 3]  # a new key; a retried status
    assert rows_to_score(block, reuse=False)["movie_id"].to_pylist() == [0, 1, 2, 3]
    kept = kept_label_rows(block, reuse=True, schema=schema)
    assert kept["movie_id"].to_pylist() == [0, 2]
    assert kept["origin"].to_pylist() == ["carried", "carried"] and kept["in_previous"].to_pylist() == [True] * 2
    assert kept["run_id"].to_pylist() == ["old", "old"]
    assert kept_label_rows(block, reuse=False, schema=schema).num_rows == 0


def test_kept_rows_are_rows_of_the_contract_with_their_old_values():
    schema = labels_schema()
    row = {name: None for name in schema.names} | {"movie_id": 7, "title": "T", "status": "ok",
                                                    "model_version": "cnn-e1-abc", "run_id": "r1",
                                                    "labelled_at": 1_700_000_000_000_000, "score_drama": 0.5}
    previous = pa.Table.from_pylist([row], schema=schema)
    block = pa.table({"movie_id": [7], **{PREVIOUS + name: previous.column(name) for name in schema.names
                                          if name not in ("movie_id", "signals")}})
    kept = known_label_rows(block, PREVIOUS, schema)
    assert kept.schema.equals(schema)
    # a column the old night lacked (here: signals) reads as null
    assert kept.to_pylist() == [{**previous.to_pylist()[0], "signals": None}]
