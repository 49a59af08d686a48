"""The guest kernel and initrd every test that boots a real guest uses.

They are the ones ``make setup`` builds into ``$DATA_DIR/system`` (default
``/var/lib/dataplane/system``); :func:`shared_artifacts` makes sure they are
current (a no-op when they are) and is computed once per test session.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import anyio

from managers.guest import GuestArtifacts, ensure_artifacts

SYSTEM_DIR = Path(os.environ.get("DATA_DIR", "/var/lib/dataplane")) / "system"


@cache
def shared_artifacts() -> GuestArtifacts:
    return anyio.run(ensure_artifacts, SYSTEM_DIR)
