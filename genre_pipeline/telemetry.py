"""Prometheus metrics: names in one place, live counters through Ray, a push to a Pushgateway at job end.

A metrics failure never costs a night's labels: pushing logs a warning and the job goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

logger = logging.getLogger(__name__)

PREFIX = "genre_pipeline_"
PUSH_TIMEOUT_SECONDS = 10


def push_job_outcome(
    gateway: str | None, *, job: str, run_id: str, gauges: Mapping[str, tuple[float, str]],
    labelled: Mapping[str, Mapping[tuple[str, str], float]] | None = None,
) -> bool:
    """Push gauges `{name: (value, help)}` and labelled gauges `{name: {(label, value): number}}`.

    Grouping key: job name and run, so each night's push stays apart and the last success is queryable.
    """
    if not gateway:
        return False
    registry = CollectorRegistry()
    for name, (value, help_text) in gauges.items():
        Gauge(PREFIX + name, help_text, registry=registry).set(value)
    for name, series in (labelled or {}).items():
        label_names = sorted({label for label, _ in series})
        gauge = Gauge(PREFIX + name, name.replace("_", " "), label_names, registry=registry)
        for (label, label_value), number in series.items():
            gauge.labels(**{label: label_value}).set(number)
    Gauge(PREFIX + "last_push_timestamp_seconds", "Unix time of this push", registry=registry).set(time.time())
    try:
        push_to_gateway(gateway, job=job, registry=registry, grouping_key={"run_id": run_id},
                        timeout=PUSH_TIMEOUT_SECONDS)
    except OSError as error:
        logger.warning("could not push metrics to the Pushgateway at %s: %s (the job's output is unaffected)",
                       gateway, error)
        return False
    return True
