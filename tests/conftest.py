"""Suite-wide fixtures. Subsystem fixtures live in tests/support/ and are imported where used."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"
