"""The long-lived state of one server process, owned by the app's lifespan.

Everything a handler needs beyond the request comes from here: settings, the
spec, the start time, the readiness phase and (as subsystems land) the managers.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from litestar import Litestar

from dataplane import __version__
from dataplane.settings import Settings
from dataplane.spec import Spec
from managers.paths import Paths

log = logging.getLogger("dataplane.runtime")

Phase = Literal["starting", "ok", "stopping"]


@dataclass(frozen=True, slots=True)
class HypervisorInfo:
    kind: Literal["cloud-hypervisor", "qemu"]
    version: str | None = None
    acceleration: Literal["kvm", "tcg"] | None = None


class Runtime:
    # A plain class, not a dataclass: Litestar's DI would otherwise try to
    # convert it field by field when injecting it into handlers.
    def __init__(self, settings: Settings, spec: Spec) -> None:
        self.settings = settings
        self.spec = spec
        self.version = __version__
        self.phase: Phase = "starting"
        self.started_monotonic = time.monotonic()
        self.paths = Paths(settings.data_dir)
        self.hypervisor = HypervisorInfo(kind=self._hypervisor_kind())

    def _hypervisor_kind(self) -> Literal["cloud-hypervisor", "qemu"]:
        choice = self.settings.hypervisor
        if choice != "auto":
            return choice
        binary = self.settings.cloud_hypervisor_bin or "cloud-hypervisor"
        return "cloud-hypervisor" if shutil.which(binary) else "qemu"

    @property
    def uptime_seconds(self) -> float:
        return time.monotonic() - self.started_monotonic

    @asynccontextmanager
    async def lifespan(self, _: Litestar) -> AsyncIterator[None]:
        self.paths.ensure()
        self.phase = "ok"
        log.info(
            "dataplane %s ready",
            self.version,
            extra={"data_dir": str(self.settings.data_dir), "node_id": self.settings.node_id},
        )
        try:
            yield
        finally:
            self.phase = "stopping"
            log.info("dataplane stopping")
