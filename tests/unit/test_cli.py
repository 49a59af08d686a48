"""Process-level set-up done by the ``dataplane`` command."""

from __future__ import annotations

import resource
import subprocess
import sys

from dataplane.cli import OPEN_FILES_CAP

PROBE = """
import resource
from dataplane.cli import raise_open_file_limit
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
print(raise_open_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def test_the_open_file_limit_is_lifted_to_the_hard_limit() -> None:
    # In a child, so this test process keeps its own limits.
    out = subprocess.run(
        [sys.executable, "-c", PROBE], check=True, capture_output=True, text=True
    ).stdout.split()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    expected = OPEN_FILES_CAP if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_CAP)
    assert [int(x) for x in out] == [expected, expected]
