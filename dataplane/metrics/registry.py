"""The metrics the dataplane keeps as things happen: requests, operations, image builds.

Everything counted at the moment it happens lives in one :class:`Metrics` per app (its own
``CollectorRegistry``, never the library's global one, so two apps in one process, as in the
tests, never mix). What is read at scrape time (instances, images, VMMs, logs, webhooks) is in
``scrape.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.process_collector import ProcessCollector

# A `_created` gauge beside every counter and histogram doubles the series for a figure
# Prometheus does not use; the switch is process-wide, and nothing else here wants them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Requests answer in microseconds to seconds (a create boots a VM).
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Instance operations: a pause takes milliseconds, a standby of a large guest a minute.
_OPERATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Image pulls and builds: seconds to many minutes.
_BUILD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

# What a request's method label may be; anything else is counted as "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The route label of a request that matches no path in the spec: one series, whatever the path.
UNMATCHED = "unmatched"


class Metrics:
    """The app's own registry and the metrics updated as things happen."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "dataplane_http_requests",
            "HTTP requests answered, by method, route template (from the spec) and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "dataplane_http_request_duration_seconds",
            "Time from a request's arrival to its response's status line (a stream's first "
            "byte), by method and route template.",
            ["method", "route"],
            buckets=_HTTP_BUCKETS,
            registry=self.registry,
        )
        self.operations = Histogram(
            "dataplane_instance_operation_duration_seconds",
            "Durations of instance operations that succeeded, by operation.",
            ["operation"],
            buckets=_OPERATION_BUCKETS,
            registry=self.registry,
        )
        self.pull_seconds = Histogram(
            "dataplane_image_pull_duration_seconds",
            "Time an image build spent fetching its manifest, config and missing layers.",
            buckets=_BUILD_BUCKETS,
            registry=self.registry,
        )
        self.build_seconds = Histogram(
            "dataplane_image_build_duration_seconds",
            "Time from a build's start to its disk being ready (pull, unpack, convert).",
            buckets=_BUILD_BUCKETS,
            registry=self.registry,
        )
        self.pulled_bytes = Counter(
            "dataplane_image_pulled_bytes",
            "Compressed layer bytes downloaded from registries by successful builds.",
            registry=self.registry,
        )
        self.build_failures = Counter(
            "dataplane_image_build_failures",
            "Image builds that failed, by reason (an error code).",
            ["reason"],
            registry=self.registry,
        )

    @contextmanager
    def operation(self, name: str) -> Iterator[None]:
        """Time an instance operation; observed only when it succeeds."""
        started = time.perf_counter()
        yield
        self.operations.labels(name).observe(time.perf_counter() - started)

    # -- the image manager's BuildObserver -------------------------------------------------
    def build_finished(self, pull_seconds: float, pulled_bytes: int, total_seconds: float) -> None:
        """An image build ended ready."""
        self.pull_seconds.observe(pull_seconds)
        self.build_seconds.observe(total_seconds)
        self.pulled_bytes.inc(pulled_bytes)

    def build_failed(self, reason: str) -> None:
        """An image build failed with the error code ``reason``."""
        self.build_failures.labels(reason).inc()
