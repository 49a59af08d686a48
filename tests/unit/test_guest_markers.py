"""Parsing the init's serial markers."""

from __future__ import annotations

import pytest

from managers.guest import (
    MARKER_PREFIX,
    Marker,
    MarkerKind,
    parse_marker,
    parse_markers,
    program_output,
)


@pytest.mark.parametrize(
    ("line", "marker"),
    [
        ("@@dataplane-guest@@ init-started", Marker(MarkerKind.INIT_STARTED)),
        ("@@dataplane-guest@@ program-started\n", Marker(MarkerKind.PROGRAM_STARTED)),
        ("@@dataplane-guest@@ program-exited code=0\r\n", Marker(MarkerKind.PROGRAM_EXITED, 0)),
        ("@@dataplane-guest@@ program-exited code=137", Marker(MarkerKind.PROGRAM_EXITED, 137)),
        (
            "@@dataplane-guest@@ error reason=bad-config detail=config: checksum mismatch",
            Marker(MarkerKind.ERROR, reason="bad-config", detail="config: checksum mismatch"),
        ),
        ("@@dataplane-guest@@ error reason=x", Marker(MarkerKind.ERROR, reason="x", detail="")),
    ],
)
def test_markers_parse(line: str, marker: Marker) -> None:
    assert parse_marker(line) == marker


@pytest.mark.parametrize(
    "line",
    [
        "",
        "program-started",
        " @@dataplane-guest@@ program-started",
        "@@dataplane-guest@@ program-started now",
        "@@dataplane-guest@@ program-exited",
        "@@dataplane-guest@@ program-exited code=x",
        "@@dataplane-guest@@ error detail=no reason",
        "@@dataplane-guest@@ rebooting",
        "[    1.0] @@dataplane-guest@@ init-started",
    ],
)
def test_other_lines_are_not_markers(line: str) -> None:
    assert parse_marker(line) is None


def test_program_output_is_exact_between_markers() -> None:
    serial = (
        b"[    0.1] kernel noise\r\n\n"
        + MARKER_PREFIX.encode() + b"init-started\n\n"
        + MARKER_PREFIX.encode() + b"program-started\n"
        + b"out\x00put\r\nno newline at end"
        + b"\n" + MARKER_PREFIX.encode() + b"program-exited code=3\n[    2.0] reboot\r\n"
    )  # fmt: skip
    assert program_output(serial) == b"out\x00put\r\nno newline at end"
    assert [m.kind for m in parse_markers(serial)] == [
        MarkerKind.INIT_STARTED,
        MarkerKind.PROGRAM_STARTED,
        MarkerKind.PROGRAM_EXITED,
    ]
    assert parse_markers(serial)[-1].exit_code == 3


def test_program_output_while_running_and_before_start() -> None:
    started = b"\n" + MARKER_PREFIX.encode() + b"program-started\n"
    assert program_output(b"boot\n") is None
    assert program_output(started + b"partial") == b"partial"
    assert (
        program_output(started + b"\n" + MARKER_PREFIX.encode() + b"program-exited code=0\n") == b""
    )
