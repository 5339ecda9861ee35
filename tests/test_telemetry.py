"""Metric names and wiring, and Ray's live metrics as a real Ray node exports them.

The live test runs the label job, as a process of its own, on a Ray node of its own (`ray start`): one with a 1 s
metrics report interval (the default is 10 s) and with no other job's counts in it, so the exported numbers must
equal the job's exactly.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, load_job, read_night, save_random_model
from prometheus_client.parser import text_string_to_metric_families
from ray_nodes import HeadNode, head_node

from genre_pipeline import telemetry
from genre_pipeline.data import posters
from genre_pipeline.data.catalog import CATALOG_SCHEMA
from genre_pipeline.data.images import PreprocessSpec
from genre_pipeline.data.sample import draw_poster, jpeg_bytes
from genre_pipeline.genres import GENRES
from genre_pipeline.label.night import LabelSummary
from genre_pipeline.label.pipeline import LabelConfig
from genre_pipeline.model.checkpoints import ModelMeta
from genre_pipeline.statuses import STATUSES

# movie_id -> the status the label job must give it
LABEL_INPUT_STATUS = {**{i: "ok" for i in range(1, 7)}, 7: "missing_poster", 8: "missing_poster",
                      9: "unreadable_poster"}
RAY_PREFIX = "ray_"  # Ray prefixes every application metric it exports
METRICS_DEADLINE_SECONDS = 60


def write_label_inputs(root: Path) -> tuple[str, str]:
    """A catalogue with LABEL_INPUT_STATUS's posters (none, absent file, garbage) and a checkpoint for it.

    2 of its 8 posters fail, more than the job's default --max-failed-fraction: runs on it pass 1."""
    model = save_random_model(root / "model")
    (root / "posters").mkdir()
    rng = np.random.default_rng(0)
    for movie_id in range(1, 7):
        (root / "posters" / f"{movie_id}.jpg").write_bytes(jpeg_bytes(draw_poster(["Comedy"], rng, (48, 72))))
    (root / "posters" / "9.jpg").write_bytes(b"not an image")
    uris = {i: str(root / "posters" / f"{i}.jpg") for i in (1, 2, 3, 4, 5, 6, 8, 9)}  # 8.jpg is never written
    ids = sorted(LABEL_INPUT_STATUS)
    table = pa.table({"movie_id": ids, "title": [f"Movie {i}" for i in ids], "year": [1999] * len(ids),
                      "genres": [["Comedy"]] * len(ids), "poster_uri": [uris.get(i) for i in ids],
                      "split": ["test"] * len(ids)}, schema=CATALOG_SCHEMA)
    pq.write_table(table, root / "catalog.parquet")
    return str(root / "catalog.parquet"), model


def expected_status_counts() -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in LABEL_INPUT_STATUS.values():
        counts[status] = counts.get(status, 0) + 1
    return counts


def live_metrics() -> list[telemetry.LiveMetric]:
    """Every LiveMetric the telemetry module defines: a new one cannot miss the naming and docs checks."""
    return [value for value in vars(telemetry).values() if isinstance(value, telemetry.LiveMetric)]


# --- names ---------------------------------------------------------------------------------------------------


def test_live_metrics_follow_prometheus_naming():
    described = {(m.name, m.kind, m.tag_keys) for m in live_metrics()}
    assert described == {
        ("genre_pipeline_posters_total", "counter", ("status",)),
        ("genre_pipeline_predict_batch_seconds", "histogram", ("device",)),
        ("genre_pipeline_label_rows_written_total", "counter", ()),
    }
    histogram = telemetry.PREDICT_BATCH_SECONDS
    assert list(histogram.boundaries) == sorted(histogram.boundaries) and histogram.boundaries[0] > 0


def pushed_label_names(monkeypatch) -> set[str]:
    """The names the label job pushes, from its own push_metrics (the push itself is captured, not sent)."""
    job, pushed = load_job("label_catalog"), {}
    monkeypatch.setattr(job, "push_job_outcome", lambda gateway, **kwargs: pushed.update(kwargs))
    summary = LabelSummary("genre_pipeline.labels", 1, "2026-01-01-abc", "cnn-e1-x", {"ok": 3, "fetch_failed": 1},
                           {"scored": 4}, 0, 1.0, 2.0)
    job.push_metrics("gateway:9091", LabelConfig(catalog="c", model="m", output="o", run_date="2026-01-01"), summary)
    registry = telemetry.outcome_registry(pushed["gauges"], pushed["labelled"])
    assert (pushed["job"], pushed["run"]) == ("genre_pipeline_label", "2026-01-01")
    rows = {s.labels["status"]: s.value for m in registry.collect() if m.name == "genre_pipeline_label_rows"
            for s in m.samples}
    assert rows == {status: {"ok": 3.0, "fetch_failed": 1.0}.get(status, 0.0) for status in STATUSES}
    return {metric.name for metric in registry.collect()}


def pushed_train_names(monkeypatch) -> set[str]:
    job, pushed = load_job("train_genre_model"), {}
    monkeypatch.setattr(job, "push_job_outcome", lambda gateway, **kwargs: pushed.update(kwargs))
    metrics = {f"val_{name}": 0.5 for name in ("f1_micro", "f1_macro", "f1_samples", "map_at_1", "map_at_3",
                                                 "map_at_5")}
    meta = ModelMeta(arch="cnn", genres=list(GENRES), preprocess=PreprocessSpec(image_size=32),
                     thresholds=[0.5] * len(GENRES), epoch=3, metrics=metrics, model_version="cnn-e3-abc")
    config = job.TrainJobConfig(catalog="c", storage_path="s", name="nightly-cnn")
    job.push_metrics("gateway:9091", config, job.TrainSummary("s/nightly-cnn/model", meta, 4), 12.5)
    assert (pushed["job"], pushed["run"]) == ("genre_pipeline_train", "nightly-cnn")
    registry = telemetry.outcome_registry(pushed["gauges"], pushed["labelled"])
    values = {sample.name: sample.value for metric in registry.collect() for sample in metric.samples}
    assert values["genre_pipeline_train_val_map_at_3"] == 0.5 and values["genre_pipeline_train_best_epoch"] == 3
    assert values["genre_pipeline_train_epochs"] == 4 and values["genre_pipeline_train_duration_seconds"] == 12.5
    return {metric.name for metric in registry.collect()}


def test_pushed_metrics_are_gauges_named_by_convention_and_documented(monkeypatch):
    failures = {"genre_pipeline_label_last_failure_timestamp_seconds",
                "genre_pipeline_train_last_failure_timestamp_seconds"}
    names = pushed_label_names(monkeypatch) | pushed_train_names(monkeypatch) | failures
    assert names >= {"genre_pipeline_label_rows", "genre_pipeline_label_duration_seconds",
                     "genre_pipeline_label_posters_per_second", "genre_pipeline_label_last_success_timestamp_seconds",
                     "genre_pipeline_model_info"}
    documented = set(re.findall(r"^\| `([a-z0-9_:]+)`", (REPO / "docs" / "operations.md").read_text(), re.MULTILINE))
    live = {RAY_PREFIX + metric.name for metric in live_metrics()}
    missing = sorted((names | live) - documented)
    assert not missing, "docs/operations.md (Metrics) lacks " + ", ".join(missing)
    assert all(name.startswith("genre_pipeline_") and not name.endswith("_total") for name in names)


def test_decode_counts_each_poster_once_by_final_status(monkeypatch):
    recorded: list[tuple[str, float, dict]] = []

    class FakeCounter:
        def inc(self, value, tags=None):
            recorded.append(("inc", value, tags))

    monkeypatch.setattr(telemetry.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(telemetry, "_ray_metric", lambda spec: FakeCounter())
    good = jpeg_bytes(draw_poster(["Drama"], np.random.default_rng(1), (40, 60)))
    batch = {"poster_uri": np.array(["a", "b", "c", "d"], dtype=object),
             "poster_bytes": np.array([good, b"junk", None, good], dtype=object),
             "status": np.array(["ok", "ok", "fetch_failed", "ok"], dtype=object),
             "error": np.array([None, None, "boom", None], dtype=object)}
    posters.decode_posters(batch, image_size=16)
    assert sorted((value, tags["status"]) for _, value, tags in recorded) == [
        (1, "fetch_failed"), (1, "unreadable_poster"), (2, "ok")]


def record_one_of_each() -> None:
    telemetry.count_posters(["ok", "ok", "fetch_failed"])
    telemetry.observe_predict_batch(0.1, "cpu")
    telemetry.count_label_rows_written(3)


def test_recording_without_ray_or_with_a_broken_metric_never_raises(monkeypatch, caplog):
    tried: list[str] = []

    class BrokenAgent:  # a metric object whose agent has gone away
        def inc(self, value, tags=None):
            raise RuntimeError("metrics agent unreachable")

        observe = inc

    def broken_metric(spec):
        tried.append(spec.name)
        if spec.kind == "counter":
            raise RuntimeError("cannot register the metric")
        return BrokenAgent()

    monkeypatch.setattr(telemetry, "_ray_metric", broken_metric)
    monkeypatch.setattr(telemetry.ray, "is_initialized", lambda: False)
    record_one_of_each()
    assert tried == []  # outside Ray: not even tried
    monkeypatch.setattr(telemetry.ray, "is_initialized", lambda: True)
    with caplog.at_level("DEBUG", logger=telemetry.__name__):
        record_one_of_each()  # creating a metric fails (counters), recording one fails (the histogram)
    recorded = [telemetry.POSTERS.name, telemetry.POSTERS.name, telemetry.PREDICT_BATCH_SECONDS.name,
                telemetry.LABEL_ROWS_WRITTEN.name]  # posters: one series per status
    assert tried == recorded
    assert [record.getMessage() for record in caplog.records] == [f"could not record {name}" for name in recorded]
    assert all(record.exc_info for record in caplog.records)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_push_to_an_unreachable_gateway_warns_and_returns_false(caplog):
    gateway = f"127.0.0.1:{closed_port()}"
    with caplog.at_level("WARNING"):
        pushed = telemetry.push_job_outcome(gateway, job="genre_pipeline_label", run="2026-01-01",
                                            gauges={"label_duration_seconds": (1.0, "x")})
    assert pushed is False
    assert f"could not push metrics to the Pushgateway at {gateway}" in caplog.text
    assert telemetry.push_job_outcome(None, job="j", run="r", gauges={}) is False


# --- live, through a real Ray node --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fast_metrics_node() -> Iterator[HeadNode]:
    """A Ray node of its own (`ray start`), reporting metrics every second and holding no other job's counts."""
    with head_node("--system-config", json.dumps({"metrics_report_interval_ms": 1000})) as node:
        yield node


def exported_samples(url: str) -> list:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name.startswith(RAY_PREFIX + telemetry.PREFIX)]


def live_totals(samples: list) -> dict[str, object]:
    """Our metrics summed over Ray's per-worker series."""
    posters: dict[str, float] = {}
    totals = {"rows_written": 0.0, "batches": 0.0, "devices": set()}
    for sample in samples:
        if sample.name == RAY_PREFIX + telemetry.POSTERS.name:
            posters[sample.labels["status"]] = posters.get(sample.labels["status"], 0.0) + sample.value
        elif sample.name == RAY_PREFIX + telemetry.LABEL_ROWS_WRITTEN.name:
            totals["rows_written"] += sample.value
        elif sample.name == RAY_PREFIX + telemetry.PREDICT_BATCH_SECONDS.name + "_count":
            totals["batches"] += sample.value
            totals["devices"].add(sample.labels["device"])
    return {"posters": posters, **totals}


def test_ray_exports_the_label_jobs_live_metrics(fast_metrics_node, tmp_path):
    catalog, model = write_label_inputs(tmp_path)
    run_date = datetime.now(timezone.utc).date().isoformat()
    done = fast_metrics_node.run_job("label_catalog", "--catalog", catalog, "--model", model,
                                     "--output", str(tmp_path / "labels"), "--run-date", run_date, "--batch-size", "4",
                                     "--max-failed-fraction", "1")  # the fixture is mostly bad posters on purpose
    assert done.returncode == 0, done.stderr[-3000:]
    labels = read_night(tmp_path / "labels", run_date)
    assert dict(Counter(labels["status"].to_pylist())) == expected_status_counts()
    expected = {"posters": {s: float(n) for s, n in expected_status_counts().items()},
                "rows_written": float(len(LABEL_INPUT_STATUS))}
    # Workers report every second; the node's agent serves the sums. Poll until they show, within a deadline.
    deadline, totals = time.monotonic() + METRICS_DEADLINE_SECONDS, {}
    while time.monotonic() < deadline:
        totals = live_totals(exported_samples(fast_metrics_node.metrics_url))
        if {key: totals[key] for key in expected} == expected and totals["batches"] >= 2:
            break
        time.sleep(0.5)
    assert {key: totals.get(key) for key in expected} == expected, totals
    # 6 scorable posters in batches of at most 4: at least 2 forward passes, on the CPU.
    assert totals["batches"] >= 2 and totals["devices"] == {"cpu"}
