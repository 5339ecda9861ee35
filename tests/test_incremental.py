"""label/incremental.py without Ray: input keys, which rows are reused and from where, and the rows kept."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from genre_pipeline.data.storage import StorageOptions
from genre_pipeline.label.contract import INPUT_KEY, labels_schema
from genre_pipeline.label.incremental import (
    PREVIOUS,
    STAGED,
    add_input_keys,
    hide_unchanged_posters,
    known_label_rows,
    reuse_origins,
    rows_to_score_first,
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


def test_the_gpu_fetch_skips_the_posters_of_reused_rows():
    block = joined(["a", "b"], ["a", "x"], ["ok", "ok"])
    batch = {name: np.array(block.column(name).to_pylist(), dtype=object) for name in block.column_names}
    batch["poster_uri"] = np.array(["/p/1.jpg", "/p/2.jpg"], dtype=object)
    batch[PREVIOUS + "status"] = np.array(["ok", float("nan")], dtype=object)  # an all-null column's NaN form
    assert hide_unchanged_posters(batch, reuse=True)["poster_uri"].tolist() == [None, "/p/2.jpg"]


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


def test_the_rows_to_score_come_first_in_their_block():
    block = joined(keys=["a", "b", "c", "d"], previous=["a", "x", "c", None], previous_status=["ok", "ok", "ok", None])
    ordered = rows_to_score_first(block, reuse=True)
    assert ordered["movie_id"].to_pylist() == [1, 3, 0, 2]  # b and d changed; each group keeps its order


def test_an_actor_with_nothing_to_score_never_loads_the_model(tmp_path):
    from datetime import datetime, timezone
    from pathlib import Path

    from conftest import save_random_model

    from genre_pipeline.label.actor import IncrementalLabeller
    from genre_pipeline.model.checkpoints import pin_model

    model = pin_model(save_random_model(tmp_path / "model", image_size=32))
    (Path(model.uri) / "model.pt").unlink()  # loading it now would fail
    labeller = IncrementalLabeller(staging=str(tmp_path / "staging"), reuse=True, model=model, run_id="r",
                                   labelled_at=datetime.now(timezone.utc), fetch_and_decode=True)
    schema = labels_schema()
    rows = [{name: None for name in schema.names} | {"movie_id": i, "status": "ok", "model_version": "m",
                                                      "run_id": "old", "labelled_at": 0, INPUT_KEY: f"k{i}"}
            for i in range(3)]
    previous = pa.Table.from_pylist(rows, schema=schema)
    block = pa.table({"movie_id": [0, 1, 2], INPUT_KEY: ["k0", "k1", "k2"],
                      **{PREVIOUS + name: previous.column(name) for name in schema.names if name != "movie_id"}})
    out = labeller(block)
    assert out["run_id"].to_pylist() == ["old"] * 3 and out["origin"].to_pylist() == ["carried"] * 3
    assert labeller.labeller is None and not (tmp_path / "staging").exists()
