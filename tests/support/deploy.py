"""The systemd unit's privileges, for tests that run the server under exactly them."""

from __future__ import annotations

import shutil
from pathlib import Path

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "dataplane.service"


def unit_directive(name: str) -> list[str]:
    """Every value of ``name=`` in the unit's [Service] section, in order."""
    values: list[str] = []
    for line in UNIT.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == name:
            values.append(value.strip())
    return values


def unit_capabilities() -> list[str]:
    """The unit's ``CapabilityBoundingSet``, as setpriv names them (``net_admin``)."""
    [line] = unit_directive("CapabilityBoundingSet")
    return [cap.removeprefix("CAP_").lower() for cap in line.split()]


def as_the_unit(without: tuple[str, ...] = ()) -> list[str]:
    """A command prefix that runs a process (as root) with only the unit's capabilities (less
    ``without``) and without new privileges, as systemd would; empty where setpriv is
    missing."""
    if shutil.which("setpriv") is None:
        return []
    keep = ",".join(f"+{cap}" for cap in unit_capabilities() if cap not in without)
    return ["setpriv", "--no-new-privs", "--inh-caps=-all", f"--bounding-set=-all,{keep}", "--"]
