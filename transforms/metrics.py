"""The pipeline's Beam counters: one namespace, and each counter object made once.

``Metrics.counter()`` builds and validates a MetricName on every call (a few microseconds per
event and counter). A counter object only names the metric; each ``inc()`` goes to the step and
bundle running at that moment on the calling thread, so one object serves every DoFn and bundle.
"""

from __future__ import annotations

from typing import Any

from apache_beam.metrics import Metrics

from transforms import NAMESPACE

_COUNTERS: dict[str, Any] = {}


def counter(name: str):
    found = _COUNTERS.get(name)
    if found is None:
        found = _COUNTERS[name] = Metrics.counter(NAMESPACE, name)
    return found


def count(name: str, n: int = 1) -> None:
    counter(name).inc(n)
