"""The jobs' end-of-run metrics through the real servers: Debian's `prometheus-pushgateway` and `prometheus`.

Both run on 127.0.0.1 as subprocesses of the test; Prometheus scrapes the Pushgateway every second with
`honor_labels: true`, as docs/operations.md tells operators to. The tests run the jobs with `--pushgateway`, parse
what they printed and poll Prometheus' HTTP API until the scrape shows the same numbers.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import labels_table, load_job, read_night
from test_telemetry import LABEL_INPUT_STATUS, closed_port, expected_status_counts, write_label_inputs

from genre_pipeline.statuses import STATUSES

DEBIAN_PACKAGES = {"prometheus-pushgateway": "prometheus-pushgateway", "prometheus": "prometheus"}
STARTUP_DEADLINE_SECONDS = 60
SCRAPE_DEADLINE_SECONDS = 60  # a scrape a second: this is many scrapes, not a guess at one
LABELLED = re.compile(r"labelled (?P<rows>\d+) movies in (?P<seconds>[\d.]+)s \((?P<statuses>[^)]*)\); "
                      r"scored (?P<scored>\d+), resumed (?P<resumed>\d+), carried (?P<carried>\d+), "
                      r"removed (?P<removed>\d+); (?P<per_second>[\d.]+) posters/s scored; "
                      r"start-up (?P<setup>[\d.]+)s; model (?P<model>\S+)")
TRAINED = re.compile(r"best epoch (?P<epoch>\d+) of (?P<epochs>\d+): (?P<metrics>.*)\nmodel (?P<model>\S+) published")
# The training tests' small settings, one epoch: the metrics' path is under test, not learning.
FAST_TRAINING = ["--arch", "cnn", "--image-size", "64", "--batch-size", "16", "--num-workers", "2",
                 "--cpus-per-worker", "0.5", "--val-fraction", "0.25", "--epochs", "1"]


@dataclass(frozen=True)
class Monitoring:
    pushgateway: str  # HOST:PORT, as the jobs' --pushgateway takes it
    prometheus: str  # base URL of Prometheus' HTTP API


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"`{name}` not found: install the Debian package {DEBIAN_PACKAGES[name]!r} "
                    f"(apt-get install {' '.join(DEBIAN_PACKAGES.values())})")
    return path


def start(command: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:  # the child keeps its own handle
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    """Poll `<url>/-/ready` until it answers 200, failing early (with the server's log) if the process died."""
    deadline = time.monotonic() + STARTUP_DEADLINE_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args[0]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} not ready after {STARTUP_DEADLINE_SECONDS}s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def scrape_config(pushgateway: str) -> str:
    return json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "pushgateway", "honor_labels": True, "scrape_interval": "1s",
                            "static_configs": [{"targets": [pushgateway]}]}],
    })


@pytest.fixture(scope="module")
def monitoring(tmp_path_factory) -> Iterator[Monitoring]:
    pushgateway_bin, prometheus_bin = binary("prometheus-pushgateway"), binary("prometheus")
    root = tmp_path_factory.mktemp("monitoring")
    pushgateway = f"127.0.0.1:{closed_port()}"
    # Debian's build persists to /var/lib/prometheus/pushgateway.data by default: keep this one in memory.
    gateway = start([pushgateway_bin, f"--web.listen-address={pushgateway}", "--persistence.file="],
                    root / "pushgateway.log")
    processes = [gateway]
    try:
        wait_ready(f"http://{pushgateway}", gateway, root / "pushgateway.log")
        (root / "prometheus.yml").write_text(scrape_config(pushgateway))
        address = f"127.0.0.1:{closed_port()}"
        prometheus = start([prometheus_bin, f"--config.file={root / 'prometheus.yml'}",
                            f"--web.listen-address={address}", f"--storage.tsdb.path={root / 'tsdb'}"],
                           root / "prometheus.log")
        processes.append(prometheus)
        wait_ready(f"http://{address}", prometheus, root / "prometheus.log")
        yield Monitoring(pushgateway, f"http://{address}")
    finally:
        for process in processes:
            stop(process)


def query(monitoring: Monitoring, promql: str) -> list[dict]:
    url = f"{monitoring.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


def query_until(monitoring: Monitoring, promql: str, done: Callable[[list[dict]], bool]) -> list[dict]:
    """Poll until the result satisfies `done` (the pushed values have been scraped), within a deadline."""
    deadline, result = time.monotonic() + SCRAPE_DEADLINE_SECONDS, []
    while time.monotonic() < deadline:
        result = query(monitoring, promql)
        if done(result):
            return result
        time.sleep(0.5)
    pytest.fail(f"{promql}: not scraped as expected within {SCRAPE_DEADLINE_SECONDS}s; last result {result}")


def values_by(result: list[dict], label: str) -> dict[str, float]:
    return {series["metric"][label]: float(series["value"][1]) for series in result}


def single_value(monitoring: Monitoring, promql: str) -> float:
    result = query_until(monitoring, promql, lambda r: len(r) == 1)
    return float(result[0]["value"][1])


def wait_for_push_since(monitoring: Monitoring, promql: str, started: float) -> float:
    """Poll until the run's own timestamp gauge is scraped: a push replaces (or adds to) its group at once, so
    from then on every series of the group that Prometheus returns is this run's."""
    result = query_until(monitoring, promql, lambda r: len(r) == 1 and started <= float(r[0]["value"][1]))
    timestamp = float(result[0]["value"][1])
    assert timestamp <= time.time()
    return timestamp


@pytest.fixture(scope="module")
def label_inputs(tmp_path_factory) -> tuple[str, str]:
    return write_label_inputs(tmp_path_factory.mktemp("label-inputs"))


def test_label_job_outcome_reaches_prometheus(ray_local, monitoring, label_inputs, tmp_path, capsys):
    catalog, model = label_inputs
    started = time.time()
    code = load_job("label_catalog").main(["--catalog", catalog, "--model", model, "--output", str(tmp_path),
                                           "--run-date", "2026-11-20", "--pushgateway", monitoring.pushgateway,
                                           "--max-failed-fraction", "1"])
    assert code == 0
    printed = LABELLED.search(capsys.readouterr().out)
    assert printed, "the job's summary line changed"
    by_status = {k: float(v) for k, v in (item.split("=") for item in printed["statuses"].split(", "))}
    assert by_status == {status: float(n) for status, n in expected_status_counts().items()}

    night = '{job="genre_pipeline_label", run="2026-11-20"}'
    wait_for_push_since(monitoring, f"genre_pipeline_label_last_success_timestamp_seconds{night}", started)
    rows = query_until(monitoring, f"genre_pipeline_label_rows{night}", lambda r: len(r) == len(STATUSES))
    assert values_by(rows, "status") == {status: by_status.get(status, 0.0) for status in STATUSES}
    assert sum(values_by(rows, "status").values()) == int(printed["rows"]) == len(LABEL_INPUT_STATUS)
    origins = query_until(monitoring, f"genre_pipeline_label_rows_by_origin{night}", lambda r: len(r) == 3)
    assert values_by(origins, "origin") == {"scored": float(printed["scored"]), "resumed": 0.0, "carried": 0.0}
    assert float(printed["scored"]) == len(LABEL_INPUT_STATUS)
    info = query_until(monitoring, f"genre_pipeline_model_info{night}", lambda r: len(r) == 1)
    assert info[0]["metric"]["model_version"] == printed["model"] and info[0]["value"][1] == "1"
    # The summary line rounds to 0.1; the pushed values are exact.
    assert single_value(monitoring, f"genre_pipeline_label_posters_per_second{night}") == pytest.approx(
        float(printed["per_second"]), abs=0.051)
    assert single_value(monitoring, f"genre_pipeline_label_duration_seconds{night}") == pytest.approx(
        float(printed["seconds"]), abs=0.051)


def test_failed_label_job_pushes_its_failure_time(ray_local, monitoring, label_inputs, tmp_path, caplog):
    catalog, _ = label_inputs
    started = time.time()
    with caplog.at_level(logging.ERROR):
        code = load_job("label_catalog").main(["--catalog", catalog, "--model", str(tmp_path / "no-model"),
                                               "--output", str(tmp_path / "labels"), "--run-date", "2026-11-21",
                                               "--pushgateway", monitoring.pushgateway])
    assert code == 2 and "no-model: cannot read: not found" in caplog.text
    night = '{job="genre_pipeline_label", run="2026-11-21"}'
    wait_for_push_since(monitoring, f"genre_pipeline_label_last_failure_timestamp_seconds{night}", started)
    assert query(monitoring, f"genre_pipeline_label_rows{night}") == []


def test_a_night_whose_posters_all_fail_is_not_committed_and_pushes_its_failure(ray_local, monitoring, label_inputs,
                                                                               tmp_path, caplog):
    """The systemic-failure guard: every poster unreachable (here: outside the poster root, as a wrong root or
    expired credentials would make it) keeps the previous night and reports a failure, not a night of errors."""
    catalog, model = label_inputs
    job = ["--catalog", catalog, "--model", model, "--output", str(tmp_path / "labels"), "--run-date", "2026-11-23",
           "--pushgateway", monitoring.pushgateway]
    assert load_job("label_catalog").main([*job, "--max-failed-fraction", "1"]) == 0
    good = labels_table(tmp_path / "labels").current_snapshot().snapshot_id
    started = time.time()
    with caplog.at_level(logging.ERROR):
        code = load_job("label_catalog").main([*job, "--full", "--poster-root", str(tmp_path / "nowhere")])
    assert code == 2 and "8 of 8 movies failed" in caplog.text
    assert labels_table(tmp_path / "labels").current_snapshot().snapshot_id == good
    selector = '{job="genre_pipeline_label", run="2026-11-23"}'
    failed_at = wait_for_push_since(monitoring, f"genre_pipeline_label_last_failure_timestamp_seconds{selector}",
                                    started)
    succeeded_at = single_value(monitoring, f"genre_pipeline_label_last_success_timestamp_seconds{selector}")
    assert succeeded_at < started <= failed_at


def test_pushgateway_down_warns_and_the_labels_are_still_written(ray_local, label_inputs, tmp_path, caplog):
    catalog, model = label_inputs
    gateway = f"127.0.0.1:{closed_port()}"
    with caplog.at_level(logging.WARNING):
        code = load_job("label_catalog").main(["--catalog", catalog, "--model", model, "--output", str(tmp_path),
                                               "--run-date", "2026-11-22", "--pushgateway", gateway,
                                               "--max-failed-fraction", "1"])
    assert code == 0
    assert f"could not push metrics to the Pushgateway at {gateway}" in caplog.text
    labels = read_night(tmp_path, "2026-11-22")
    assert sorted(labels["movie_id"].to_pylist()) == sorted(LABEL_INPUT_STATUS)


@pytest.mark.slow
def test_train_job_pushes_its_final_validation_metrics(ray_local, monitoring, sample_catalog, tmp_path, capsys):
    started = time.time()
    code = load_job("train_genre_model").main(["--catalog", str(sample_catalog), *FAST_TRAINING, "--storage-path",
                                               str(tmp_path), "--name", "pushed-cnn",
                                               "--pushgateway", monitoring.pushgateway])
    assert code == 0
    printed = TRAINED.search(capsys.readouterr().out)
    assert printed, "the job's summary lines changed"
    metrics = {k: float(v) for k, v in (item.split("=") for item in printed["metrics"].split())}
    assert set(metrics) == {"val_f1_micro", "val_f1_macro", "val_f1_samples", "val_map_at_1", "val_map_at_3",
                            "val_map_at_5", "val_rows"}
    run = '{job="genre_pipeline_train", run="pushed-cnn"}'
    wait_for_push_since(monitoring, f"genre_pipeline_train_last_success_timestamp_seconds{run}", started)
    for name, value in metrics.items():  # printed with 4 significant digits
        assert single_value(monitoring, f"genre_pipeline_train_{name}{run}") == pytest.approx(value, abs=5.1e-5)
    assert single_value(monitoring, f"genre_pipeline_train_best_epoch{run}") == int(printed["epoch"])
    assert single_value(monitoring, f"genre_pipeline_train_epochs{run}") == int(printed["epochs"])
    info = query_until(monitoring, f"genre_pipeline_model_info{run}", lambda r: len(r) == 1)
    assert info[0]["metric"]["model_version"] == printed["model"]
