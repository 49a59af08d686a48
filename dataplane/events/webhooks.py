"""Webhook delivery: the event log is the outbox; each endpoint keeps its own cursor.

Every event is on disk (``EventLog.append`` fsyncs) before any delivery starts, and an
endpoint's cursor (``events/cursors/<hash>.json``) moves only after a 2xx (and is written at
most every 100 ms while a backlog drains, and when it is drained), so delivery is at-least-once
across crashes and restarts; receivers dedupe by ``webhook-id``. Events go out in
log order, one at a time per endpoint, which keeps every resource's events in order. A failure
(a non-2xx answer, a timeout, a refused or reset connection) is retried with exponential
back-off and full jitter, from 1 s up to 5 min between tries, until the event is older than
``WEBHOOK_MAX_AGE``: then it is dropped, counted and logged, and the next one is tried.
Signatures follow the Standard Webhooks specification, made by the ``standardwebhooks`` package.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import anyio
import httpx
from standardwebhooks.webhooks import Webhook

from managers.atomic import write_json_atomic
from managers.failpoints import failpoint

from .log import EventLog, seconds_of
from .types import Event

log = logging.getLogger("dataplane.events")

FIRST_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 300.0
REQUEST_TIMEOUT_SECONDS = 10.0
CURSOR_SECONDS = 0.1


@dataclass(slots=True)
class EndpointStats:
    """What one endpoint's delivery has done since start-up."""

    delivered: int = 0
    failed_attempts: int = 0
    dropped: int = 0
    last_error: str | None = None
    cursor: int = 0
    by_result: dict[str, int] = field(default_factory=dict)


class Endpoint:
    """Delivers the log to one URL, in order, from its own durable cursor."""

    def __init__(
        self,
        url: str,
        events: EventLog,
        signer: Webhook,
        client: httpx.AsyncClient,
        max_age_seconds: float,
        cursor_dir: Path,
    ) -> None:
        self.url = url
        self.events = events
        self.signer = signer
        self.client = client
        self.max_age = max_age_seconds
        self.cursor_file = cursor_file(cursor_dir, url)
        self.stats = EndpointStats()

    def load_cursor(self) -> None:
        """The last delivered sequence number; a new endpoint starts with the next event."""
        try:
            saved = json.loads(self.cursor_file.read_text())
            self.stats.cursor = int(saved["delivered_seq"])
        except (OSError, ValueError, KeyError, TypeError):
            self.stats.cursor = self.events.next_seq - 1
            self._save_cursor()

    def _save_cursor(self) -> None:
        save_cursor(self.cursor_file, self.url, self.stats.cursor)

    async def run(self) -> None:
        """Deliver for ever (until cancelled)."""
        while True:
            await self.events.wait_after(self.stats.cursor)
            first = self.events.first_seq
            if first > self.stats.cursor + 1:
                lost = first - self.stats.cursor - 1
                self.stats.dropped += lost
                log.error(
                    "webhook %s: %d events were dropped by the log's retention before delivery",
                    self.url,
                    lost,
                )
                self.stats.cursor = first - 1
            batch = await anyio.to_thread.run_sync(
                lambda: list(self.events.read_from(self.stats.cursor + 1, limit=256))
            )
            saved_at = time.monotonic()
            for event in batch:
                await self._deliver(event)
                failpoint("events.delivered")
                self.stats.cursor = event.seq
                # Written at most every CURSOR_SECONDS while a backlog drains: a crash then
                # re-sends what was delivered since (at-least-once allows it), and a drain is
                # not held to one fsync per event.
                if time.monotonic() - saved_at >= CURSOR_SECONDS:
                    await anyio.to_thread.run_sync(self._save_cursor)
                    saved_at = time.monotonic()
            await anyio.to_thread.run_sync(self._save_cursor)

    async def _deliver(self, event: Event) -> None:
        body = json.dumps(event.envelope(), separators=(",", ":"), ensure_ascii=False).encode()
        delay = FIRST_RETRY_SECONDS
        while True:
            error = await self._attempt(event, body)
            if error is None:
                self.stats.delivered += 1
                self._count("delivered")
                return
            self.stats.failed_attempts += 1
            self.stats.last_error = error
            self._count("failed")
            age = time.time() - seconds_of(event.timestamp)
            if age > self.max_age:
                self.stats.dropped += 1
                self._count("dropped")
                log.error(
                    "webhook %s: dropped %s (%s) after %.0f s of failures: %s",
                    self.url,
                    event.id,
                    event.type,
                    age,
                    error,
                )
                return
            # Full jitter: a fleet of nodes coming back does not knock in step.
            await anyio.sleep(random.uniform(0, delay))
            delay = min(delay * 2, MAX_RETRY_SECONDS)

    async def _attempt(self, event: Event, body: bytes) -> str | None:
        now = datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "webhook-id": event.id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self.signer.sign(event.id, now, body),
            "user-agent": "dataplane-webhooks",
        }
        try:
            response = await self.client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            return None
        return f"answered {response.status_code}"

    def _count(self, result: str) -> None:
        self.stats.by_result[result] = self.stats.by_result.get(result, 0) + 1


def cursor_file(cursor_dir: Path, url: str) -> Path:
    """Where an endpoint's cursor lives: one file per URL."""
    return cursor_dir / (hashlib.sha256(url.encode()).hexdigest()[:16] + ".json")


def save_cursor(path: Path, url: str, delivered_seq: int) -> None:
    write_json_atomic(path, {"endpoint": url, "delivered_seq": delivered_seq})


def signer_for(secret: str) -> Webhook:
    return Webhook(secret)


def client() -> httpx.AsyncClient:
    # Its own pool and timeouts: a receiver that hangs holds a delivery task, never the API.
    return httpx.AsyncClient(
        timeout=httpx.Timeout(REQUEST_TIMEOUT_SECONDS),
        limits=httpx.Limits(max_connections=4, max_keepalive_connections=2),
        follow_redirects=False,
    )
