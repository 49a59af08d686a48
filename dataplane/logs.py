"""Structured logging: one JSON object or one console line per record, each with a request id.

The request id lives in a context variable set by the request-context middleware,
so every line logged while serving a request carries it, including lines from
managers that know nothing of HTTP. Extra fields passed with ``extra={...}``
(``instance_id``, ``image``, …) are kept as structured fields.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

from dataplane.settings import LogFormat
from managers.instances.logs import SegmentedLog
from managers.paths import Paths

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "request_id", "taskName", "color_message"}


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _utc_timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = (
            f"{_utc_timestamp(record.created)} {record.levelname:<7} "
            f"[{getattr(record, 'request_id', '-')}] {record.name}: {record.getMessage()}"
        )
        if extras:
            line = f"{line} {extras}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


def _utc_timestamp(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


class InstanceLogHandler(logging.Handler):
    """Copies every record about an instance (``extra={"instance_id": …}``) into that
    instance's ``dataplane`` log, which ``GET /instances/{id}/logs?source=dataplane`` serves."""

    def __init__(self, paths: Paths, log_format: LogFormat) -> None:
        super().__init__()
        self._paths = paths
        self.setFormatter(JsonFormatter() if log_format == "json" else ConsoleFormatter())
        self.addFilter(_RequestIdFilter())

    def emit(self, record: logging.LogRecord) -> None:
        instance_id = getattr(record, "instance_id", None)
        if not isinstance(instance_id, str):
            return
        folder = self._paths.instance_logs(instance_id)
        # A record about an instance being deleted must not bring its folder back.
        if not folder.is_dir():
            return
        try:
            SegmentedLog(folder, "dataplane").append(self.format(record).encode() + b"\n")
        except Exception:
            self.handleError(record)


def configure(log_format: LogFormat, level: str = "info") -> None:
    """Route every logger (ours, uvicorn's, litestar's) through one handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else ConsoleFormatter())
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "litestar"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # Requests are logged once, by our request-context middleware, with the request id.
    logging.getLogger("uvicorn.access").disabled = True
