"""Structured logging: one JSON object or one console line per record, each with a request id.

The request id lives in a context variable set by the request-context middleware,
so every line logged while serving a request carries it, including lines from
managers that know nothing of HTTP. Extra fields passed with ``extra={...}``
(``instance_id``, ``image``, …) are kept as structured fields.
"""

from __future__ import annotations

import atexit
import contextvars
import json
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

from dataplane.settings import LogFormat
from managers.instances.logs import DEFAULT_RETENTION_BYTES, LogTally, SegmentedLog
from managers.paths import Paths

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "request_id", "taskName", "color_message"}


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # A record that went through the queue already carries the id of its task.
        if not hasattr(record, "request_id"):
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
        exception = _exception(self, record)
        if exception:
            entry["exception"] = exception
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
        exception = _exception(self, record)
        if exception:
            line = f"{line}\n{exception}"
        return line


def _exception(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    if record.exc_info:
        return formatter.formatException(record.exc_info)
    return record.exc_text


def _utc_timestamp(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


class InstanceLogHandler(logging.Handler):
    """Copies every record about an instance (``extra={"instance_id": …}``) into that
    instance's ``dataplane`` log, which ``GET /instances/{id}/logs?source=dataplane`` serves."""

    def __init__(
        self,
        paths: Paths,
        log_format: LogFormat,
        tally: LogTally | None = None,
        retention_bytes: int = DEFAULT_RETENTION_BYTES,
    ) -> None:
        super().__init__()
        self._paths = paths
        self._tally = tally
        self._retention_bytes = retention_bytes
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
            SegmentedLog(
                folder, "dataplane", retention_bytes=self._retention_bytes, tally=self._tally
            ).append(self.format(record).encode() + b"\n")
        except FileNotFoundError:
            pass  # the instance was removed between the check and the write
        except Exception:
            self.handleError(record)


class _ToQueue(logging.handlers.QueueHandler):
    """Hands records to the writer thread, keeping their extras and request id.

    The request id is read here, in the task that logged, where its context
    variable is set; the message and traceback are rendered here too, because
    the arguments and the exception may not outlive the call.
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.request_id = request_id_var.get()
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record


_listener: logging.handlers.QueueListener | None = None


def configure(log_format: LogFormat, level: str = "info") -> None:
    """Route every logger (ours, uvicorn's, litestar's) to stderr, written by a thread.

    Logging calls only put the record on a queue; formatting and file writes (stderr,
    instance logs) happen in a listener thread, so a log line never blocks the event loop.
    """
    global _listener
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else ConsoleFormatter())
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    if _listener is not None:
        _listener.stop()
    _listener = logging.handlers.QueueListener(records, handler, respect_handler_level=True)
    _listener.start()
    atexit.register(_listener.stop)
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(_ToQueue(records))
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "litestar"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # Requests are logged once, by our request-context middleware, with the request id.
    logging.getLogger("uvicorn.access").disabled = True


def attach(handler: logging.Handler) -> None:
    """Add a handler: to the writer thread when :func:`configure` set one up, else to root."""
    if _listener is not None:
        _listener.handlers = (*_listener.handlers, handler)
    else:
        logging.getLogger().addHandler(handler)


def detach(handler: logging.Handler) -> None:
    if _listener is not None:
        _listener.handlers = tuple(h for h in _listener.handlers if h is not handler)
    else:
        logging.getLogger().removeHandler(handler)
