"""The serial markers the guest's init prints, and a parser for them.

Each marker is a line of its own that starts with :data:`PREFIX`::

    @@dataplane-guest@@ init-started
    @@dataplane-guest@@ program-started
    @@dataplane-guest@@ program-exited code=0
    @@dataplane-guest@@ error reason=program-not-found detail=/bin/app: not found

``init-started``
    PID 1 is running (kernel boot is over).
``program-started``
    printed by the program's process just before ``execve``; everything after this line is
    the program's stdout and stderr.
``program-exited code=N``
    the program ended; N is its exit status, or 128 + the signal that killed it. The init has
    already synced the disks; the VM powers off right after.
``error reason=SLUG detail=TEXT``
    the guest could not run the program; the VM powers off right after. ``SLUG`` is one of
    :data:`ERROR_REASONS`; ``TEXT`` is for people and never contains a control character.
    ``exec-failed`` may follow ``program-started`` (the file exists but cannot be executed).

Markers go to the serial port. Where the config names an output channel, the program's output
goes there instead (through the init's relay) and the serial port holds only the kernel's lines
and the markers. Without one, the program writes to the serial port too: every marker is then
printed as ``"\\n" + PREFIX + ...  + "\\n"``, the leading newline keeping the marker on its
own line when the program's last output had none, and the program's output is exactly the
bytes between the end of the ``program-started`` line and the newline that precedes the next
marker (:func:`program_output`).

A program running as root in the guest can still open the serial port and print a line that
looks like a marker; consumers that need certainty should treat markers as reports of a
well-behaved guest, not as proof.
"""

from __future__ import annotations

from .types import Marker, MarkerKind

PREFIX = "@@dataplane-guest@@ "
_PREFIX_BYTES = PREFIX.encode()

ERROR_REASONS = frozenset(
    {
        "no-config-disk",
        "bad-config",
        "no-image-disk",
        "no-overlay-disk",
        "no-volume-disk",
        "mount-failed",
        "network-failed",
        "config-apply-failed",
        "bad-user",
        "bad-workdir",
        "program-not-found",
        "exec-failed",
        "out-of-memory",
    }
)


def parse_marker(line: str) -> Marker | None:
    """The marker on ``line`` (a line of the serial log, with or without its line end), or None.

    Only a line that starts with :data:`PREFIX` and names a known marker is a marker.
    """
    text = line.rstrip("\r\n")
    if not text.startswith(PREFIX):
        return None
    body = text[len(PREFIX) :]
    name, _, rest = body.partition(" ")
    try:
        kind = MarkerKind(name)
    except ValueError:
        return None
    if kind is MarkerKind.PROGRAM_EXITED:
        key, _, value = rest.partition("=")
        if key != "code" or not value.lstrip("-").isdigit():
            return None
        return Marker(kind, exit_code=int(value))
    if kind is MarkerKind.ERROR:
        if not rest.startswith("reason="):
            return None
        reason_part, _, detail_part = rest.partition(" ")
        detail = detail_part.removeprefix("detail=") if detail_part.startswith("detail=") else ""
        return Marker(kind, reason=reason_part.removeprefix("reason="), detail=detail)
    if rest:
        return None
    return Marker(kind)


def parse_markers(serial: bytes) -> list[Marker]:
    """Every marker in a serial log, in order. Undecodable bytes never hide a marker."""
    found: list[Marker] = []
    for raw in serial.split(b"\n"):
        if raw.startswith(_PREFIX_BYTES):
            marker = parse_marker(raw.decode("utf-8", "replace"))
            if marker is not None:
                found.append(marker)
    return found


def program_output(serial: bytes) -> bytes | None:
    """The program's exact output bytes in a serial log, or None before ``program-started``.

    Ends at the next marker (normally ``program-exited``); while the program still runs, it is
    everything printed so far.
    """
    start_line = b"\n" + _PREFIX_BYTES + MarkerKind.PROGRAM_STARTED.value.encode() + b"\n"
    start = serial.find(start_line)
    if start < 0:
        return None
    begin = start + len(start_line)
    end = serial.find(b"\n" + _PREFIX_BYTES, begin)
    return serial[begin:] if end < 0 else serial[begin:end]
