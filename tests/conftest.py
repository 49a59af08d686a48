"""Suite-wide fixtures and hooks.

Subsystem fixtures live in tests/support/ and are imported where used. Tests that start the
Cloud Hypervisor simulator skip when its reference spec (third-party, kept outside the
repository) is absent; see ``tests/support/ch_simulator/spec.py``.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest

from tests.support.ch_simulator import spec as ch_spec


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Report every "no Cloud Hypervisor reference spec" skip at one place.

    The skip is raised inside fixtures, which pytest reports at each test's own line, so the
    ``-ra`` summary would list every test. Pointing them all at ``require_spec`` lets the summary
    fold them into one ``SKIPPED [n] …`` line with the reason.
    """
    report = yield
    longrepr = report.longrepr
    if report.skipped and isinstance(longrepr, tuple) and ch_spec.MISSING in longrepr[2]:
        report.longrepr = (
            ch_spec.__file__,
            ch_spec.require_spec.__code__.co_firstlineno,
            longrepr[2],
        )
    return report
