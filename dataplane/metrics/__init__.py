"""Prometheus metrics: kept as things happen (``registry.py``), counted per request
(``middleware.py``) and read at scrape time (``scrape.py``). See README.md."""

from __future__ import annotations

from .middleware import MetricsMiddleware
from .registry import Metrics
from .scrape import exposition

__all__ = ["Metrics", "MetricsMiddleware", "exposition"]
