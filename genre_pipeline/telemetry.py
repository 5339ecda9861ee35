"""Prometheus metrics: names in one place, live metrics through Ray, each job's outcome pushed to a Pushgateway.

Live, while a job runs: the Ray Data UDFs record through `ray.util.metrics` (`count_posters`,
`observe_predict_batch`, `count_label_rows_written`), and every Ray node exports them on its metrics port with
Ray's `ray_` prefix (`ray_genre_pipeline_posters_total`). At the end: each job pushes its outcome as gauges to a
Pushgateway, grouped by job and run. The README's Metrics section lists every name, type and label.

A metrics failure never costs a night's labels: recording and pushing log and go on.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import ray
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, pushadd_to_gateway

logger = logging.getLogger(__name__)

PREFIX = "genre_pipeline_"
PUSH_TIMEOUT_SECONDS = 10  # a Pushgateway that hangs must not hold a finished job for long
RUN_LABEL = "run"  # grouping key next to `job`: a re-run of the same night (or training run name) replaces its push
LABEL_JOB = PREFIX + "label"
TRAIN_JOB = PREFIX + "train"


@dataclass(frozen=True)
class LiveMetric:
    """A metric the Ray Data UDFs record; Ray's metric object is made once per worker process (`_ray_metric`)."""

    name: str
    kind: str  # "counter" or "histogram"
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()  # histograms only, in the metric's unit


POSTERS = LiveMetric(
    PREFIX + "posters_total", "counter",
    "Posters fetched and decoded by either job, by final status (ok, missing_poster, unreadable_poster, "
    "fetch_failed); training counts every epoch's pass", ("status",))
# From a GPU batch (tens of ms) to a CPU batch of 64 posters at 224 px (seconds).
PREDICT_BATCH_SECONDS = LiveMetric(
    PREFIX + "predict_batch_seconds", "histogram", "Wall time of one forward pass (a --batch-size batch)",
    ("device",), (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
LABEL_ROWS_WRITTEN = LiveMetric(
    PREFIX + "label_rows_written_total", "counter",
    "Label rows handed to the Parquet writer (into staging; the night is committed at the job's end)")


@functools.cache
def _ray_metric(spec: LiveMetric) -> ray.util.metrics.Metric:
    """One Ray metric object per worker process and metric: creating one per batch would re-register it."""
    from ray.util import metrics

    if spec.kind == "counter":
        return metrics.Counter(spec.name, description=spec.description, tag_keys=spec.tag_keys)
    return metrics.Histogram(spec.name, description=spec.description, boundaries=list(spec.boundaries),
                             tag_keys=spec.tag_keys)


def _record(spec: LiveMetric, value: float, tags: dict[str, str] | None = None) -> None:
    # Outside Ray (unit tests, a notebook) there is no metrics agent to report to.
    if not ray.is_initialized():
        return
    try:
        metric = _ray_metric(spec)
        if spec.kind == "counter":
            metric.inc(value, tags=tags)
        else:
            metric.observe(value, tags=tags)
    except Exception:  # a metric must never fail a batch of labels
        logger.debug("could not record %s", spec.name, exc_info=True)


def count_posters(statuses: Iterable[str]) -> None:
    """Add a batch's posters to `genre_pipeline_posters_total`, by status."""
    for status, count in Counter(map(str, statuses)).items():
        _record(POSTERS, count, {"status": status})


def observe_predict_batch(seconds: float, device: str) -> None:
    _record(PREDICT_BATCH_SECONDS, seconds, {"device": device})


def count_label_rows_written(rows: int) -> None:
    if rows > 0:  # Ray counters only take positive increments
        _record(LABEL_ROWS_WRITTEN, rows)


@dataclass(frozen=True)
class LabelledGauge:
    """A pushed gauge with one label: `{label value: number}`, e.g. rows by status, or an info metric."""

    help: str
    label: str
    values: Mapping[str, float]


def outcome_registry(gauges: Mapping[str, tuple[float, str]],
                     labelled: Mapping[str, LabelledGauge] | None = None) -> CollectorRegistry:
    """Gauges `{name: (value, help)}` and labelled gauges, named `genre_pipeline_<name>`, in a fresh registry."""
    registry = CollectorRegistry()
    for name, (value, help_text) in gauges.items():
        Gauge(PREFIX + name, help_text, registry=registry).set(value)
    for name, series in (labelled or {}).items():
        gauge = Gauge(PREFIX + name, series.help, [series.label], registry=registry)
        for label_value, number in series.values.items():
            gauge.labels(label_value).set(number)
    return registry


def _push(gateway: str, job: str, run: str, registry: CollectorRegistry, *, replace: bool) -> bool:
    push = push_to_gateway if replace else pushadd_to_gateway
    try:
        push(gateway, job=job, registry=registry, grouping_key={RUN_LABEL: run}, timeout=PUSH_TIMEOUT_SECONDS)
    except Exception as error:  # down, refusing, misconfigured: the job's output is what matters
        logger.warning("could not push metrics to the Pushgateway at %s: %s (the job's output is unaffected)",
                       gateway, error)
        return False
    logger.info("pushed %s metrics for run %s to the Pushgateway at %s", job, run, gateway)
    return True


def push_job_outcome(
    gateway: str | None, *, job: str, run: str, gauges: Mapping[str, tuple[float, str]],
    labelled: Mapping[str, LabelledGauge] | None = None,
) -> bool:
    """Replace the group {job, run} on the Pushgateway with this run's outcome; False when not pushed.

    Grouping by run (the label job's run date, the training run's name) keeps nights apart, and a re-run of a
    night replaces its own push, like it replaces its partition.
    """
    if not gateway:
        return False
    return _push(gateway, job, run, outcome_registry(gauges, labelled), replace=True)


def push_job_failure(gateway: str | None, *, job: str, run: str, name: str, timestamp: float) -> bool:
    """Add `genre_pipeline_<name>` (a failure's Unix time) to the group {job, run}, keeping what an earlier
    success of the same run pushed: that run's output is still the one committed."""
    if not gateway:
        return False
    registry = outcome_registry({name: (timestamp, "Unix time the job last failed for this run")})
    return _push(gateway, job, run, registry, replace=False)
