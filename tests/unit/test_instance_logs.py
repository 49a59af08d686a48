"""Segmented logs: offsets survive rotation, tails, partial lines, resumption."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

import anyio
import pytest

from managers.instances.logs import MAX_LINE, SegmentedLog
from managers.instances.pump import LogPump, PumpSet
from managers.instances.types import PUMPED_SOURCES


def lines_text(lines: list) -> list[bytes]:  # type: ignore[type-arg]
    return [line.text for line in lines]


def test_offsets_are_the_byte_after_each_line(tmp_path: Path) -> None:
    log = SegmentedLog(tmp_path, "app")
    log.append(b"one\ntwo\nthr")
    lines, position = log.read_lines(0)
    assert [(line.offset, line.text) for line in lines] == [(4, b"one"), (8, b"two")]
    assert position == 8
    log.append(b"ee\n")
    more, position = log.read_lines(position)
    assert [(line.offset, line.text) for line in more] == [(14, b"three")]


def test_resuming_from_an_event_id_neither_loses_nor_repeats(tmp_path: Path) -> None:
    log = SegmentedLog(tmp_path, "app", segment_bytes=64, keep=100)
    written = [f"line {n}".encode() for n in range(200)]
    for text in written:
        log.append(text + b"\n")
    seen: list[bytes] = []
    position = 0
    while True:
        lines, position = log.read_lines(position)
        if not lines:
            break
        seen.append(lines[0].text)
        position = lines[0].offset  # a client that took one line and reconnected
    assert seen == written


def test_rotation_bounds_the_size_and_keeps_global_offsets(tmp_path: Path) -> None:
    log = SegmentedLog(tmp_path, "app", segment_bytes=100, keep=2)
    for n in range(100):
        log.append(f"{n:04d}\n".encode())
    files = sorted(tmp_path.glob("app-*.log"))
    assert len(files) == 2
    assert sum(f.stat().st_size for f in files) <= 200
    assert log.end() == 500
    lines, _ = log.read_lines(0)  # rotated-away offsets continue from the oldest kept byte
    assert lines[-1].text == b"0099"
    assert lines[-1].offset == 500
    assert all(int(line.text) * 5 + 5 == line.offset for line in lines)


def test_tail_returns_the_last_lines(tmp_path: Path) -> None:
    log = SegmentedLog(tmp_path, "app", segment_bytes=1000)
    for n in range(1000):
        log.append(f"row {n}\n".encode())
    lines, position = log.tail(3)
    assert lines_text(lines) == [b"row 997", b"row 998", b"row 999"]
    assert position == log.end()
    assert log.tail(0) == ([], log.end())


def test_final_read_includes_a_trailing_partial_line(tmp_path: Path) -> None:
    log = SegmentedLog(tmp_path, "app")
    log.append(b"done\nno newline")
    assert lines_text(log.read_lines(0)[0]) == [b"done"]
    assert lines_text(log.read_lines(0, final=True)[0]) == [b"done", b"no newline"]


def test_a_runaway_line_is_cut(tmp_path: Path) -> None:
    log = SegmentedLog(tmp_path, "app", segment_bytes=10 * MAX_LINE)
    log.append(b"x" * (MAX_LINE * 2 + 10) + b"\n")
    lines, _ = log.read_lines(0)
    assert [len(line.text) for line in lines] == [MAX_LINE, MAX_LINE, 10]


def test_an_empty_log_reads_nothing(tmp_path: Path) -> None:
    log = SegmentedLog(tmp_path / "missing", "app")
    assert log.read_lines(0) == ([], 0)
    assert log.tail(5) == ([], 0)


@pytest.mark.anyio
async def test_follow_yields_new_lines(tmp_path: Path) -> None:
    log = SegmentedLog(tmp_path, "app")
    log.append(b"first\n")
    batches = log.follow(0, poll_seconds=0.01)
    assert isinstance(batches, AsyncGenerator)
    assert lines_text(await anext(batches)) == [b"first"]
    log.append(b"second\n")
    got: list[bytes] = []
    while not got:
        got = lines_text(await anext(batches))
    assert got == [b"second"]
    await batches.aclose()


def pump_in(folder: Path) -> LogPump:
    """A pump whose files all live in ``folder``: ``serial.raw``, ``output.raw`` and
    ``vmm.log`` in, ``logs/`` out."""
    logs = folder / "logs"
    return LogPump(
        instance_id=folder.name,
        serial_raw=folder / "serial.raw",
        output_raw=folder / "output.raw",
        vmm_raw=folder / "vmm.log",
        logs={source: SegmentedLog(logs, source, keep=100) for source in PUMPED_SOURCES},
        state_file=folder / "pump.json",
        status_file=folder / "guest.json",
    )


def logged(folder: Path, source: str) -> bytes:
    """Everything the ``source`` log of ``folder/logs`` holds, byte for byte."""
    lines, _ = SegmentedLog(folder / "logs", source, keep=100).read_lines(0, final=True)
    return b"".join(line.text + b"\n" for line in lines)


def test_the_pump_gives_back_the_disk_space_of_what_it_copied(tmp_path: Path) -> None:
    raw = tmp_path / "output.raw"
    logs = tmp_path / "logs"
    pump = pump_in(tmp_path)
    # A writer that keeps its own offset (not O_APPEND), as Cloud Hypervisor's console file.
    with raw.open("wb", buffering=0) as writer:
        line = b"x" * 1023 + b"\n"
        for _ in range(4096):  # 4 MiB
            writer.write(line)
            if writer.tell() % (512 * 1024) == 0:
                pump.drain()
        (tmp_path / "serial.raw").write_bytes(b"\n@@dataplane-guest@@ program-exited code=3\n")
        pump.drain()
    assert raw.stat().st_size == 4 * 1024 * 1024
    assert raw.stat().st_blocks * 512 < 2 * 1024 * 1024, "copied blocks are freed"
    lines, _ = SegmentedLog(logs, "app", keep=100).read_lines(0)
    assert len(lines) == 4096
    assert pump.status.exit_code == 3


def test_app_is_the_console_byte_for_byte_and_markers_leave_the_serial_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pump = pump_in(tmp_path)
    program = b"binary \x00\xff\xfe\r\n\x1b[31mred\nno newline"
    (tmp_path / "output.raw").write_bytes(program)
    (tmp_path / "serial.raw").write_bytes(
        b"\n@@dataplane-guest@@ init-started\n"
        b"\n@@dataplane-guest@@ program-started\n"
        b"[    1.5] a kernel line\n"
        b"\n"
        b"kept after a blank line\n"
        b"\n@@dataplane-guest@@ program-exited code=7\n"
        b"reboot: Power down\n"
    )
    with caplog.at_level(logging.INFO, logger="managers.instances.pump"):
        pump.drain()
    assert logged(tmp_path, "app") == program + b"\n"  # the last line read as final
    console = logged(tmp_path, "console")
    assert console == b"[    1.5] a kernel line\n\nkept after a blank line\nreboot: Power down\n"
    assert pump.status.exit_code == 7
    assert pump.status.program_started_at is not None
    guest = [r for r in caplog.records if getattr(r, "instance_id", None) == tmp_path.name]
    assert [vars(r)["guest"] for r in guest] == [
        "init-started",
        "program-started",
        "program-exited",
    ]
    assert vars(guest[-1])["exit_code"] == 7


def test_a_serial_line_is_scanned_only_once_it_ends(tmp_path: Path) -> None:
    pump = pump_in(tmp_path)
    serial = tmp_path / "serial.raw"
    serial.write_bytes(b"\n@@dataplane-guest@@ program-exi")
    pump.drain()
    assert pump.status.exit_code is None
    assert logged(tmp_path, "console") == b""
    with serial.open("ab") as handle:
        handle.write(b"ted code=0\n" + b"k" * 5000)
    pump.drain()
    assert pump.status.exit_code == 0
    # A line that never ends is passed on rather than held without bound.
    assert logged(tmp_path, "console") == b"k" * 5000 + b"\n"


def test_new_vmm_files_are_read_from_their_start_even_with_the_old_inodes(
    tmp_path: Path,
) -> None:
    serial, console = tmp_path / "serial.raw", tmp_path / "output.raw"
    pump = pump_in(tmp_path)
    console.write_bytes(b"first boot\n")
    serial.write_bytes(b"\n@@dataplane-guest@@ program-exited code=1\n")
    pump.drain()
    assert pump.status.exit_code == 1
    # The next VMM's files, as large as the last ones and (as often happens once the old files
    # are removed) under the same inode numbers: rewritten in place here, so the numbers are
    # sure.
    pump.new_vmm()
    pump.new_boot()
    with console.open("r+b") as handle:
        handle.write(b"again boot\n")
    with serial.open("r+b") as handle:
        handle.write(b"\n@@dataplane-guest@@ program-exited code=0\n")
    pump.drain()
    assert pump.status.exit_code == 0
    assert logged(tmp_path, "app") == b"first boot\nagain boot\n"


def test_a_serial_line_cut_by_a_restart_is_still_read_whole(tmp_path: Path) -> None:
    serial = tmp_path / "serial.raw"
    serial.write_bytes(b"[ 1.0] kernel\n\n@@dataplane-guest@@ program-exi")
    pump_in(tmp_path).drain()
    with serial.open("ab") as handle:
        handle.write(b"ted code=5\n")
    restarted = pump_in(tmp_path)  # a new dataplane: only pump.json carries the first half
    restarted.drain()
    assert restarted.status.exit_code == 5
    assert logged(tmp_path, "console") == b"[ 1.0] kernel\n"


def test_raw_reads_are_contiguous_and_say_where_they_start(tmp_path: Path) -> None:
    log = SegmentedLog(tmp_path, "app", segment_bytes=100, keep=3)
    for n in range(50):
        log.append(b"%09d\n" % n)
    kept = log.start()
    assert kept > 0, "rotated"
    start, data = log.read_bytes(0, 30)
    assert start == kept, "bytes rotated away are skipped, and the caller is told"
    assert data == b"".join(b"%09d\n" % n for n in range(kept // 10, kept // 10 + 3))
    assert log.read_bytes(log.end(), 10) == (log.end(), b"")


def test_a_restarted_pump_continues_where_the_last_stopped(tmp_path: Path) -> None:
    console = tmp_path / "output.raw"
    console.write_bytes(b"one\n")
    pump_in(tmp_path).drain()
    with console.open("ab") as handle:
        handle.write(b"two\n")
    pump_in(tmp_path).drain()
    assert logged(tmp_path, "app") == b"one\ntwo\n"


def test_a_line_written_in_pieces_is_never_split_by_rotation(tmp_path: Path) -> None:
    log = SegmentedLog(tmp_path, "app", segment_bytes=16, keep=10)
    for piece in (b"0123456789", b"abcdefghij", b"KLMNO\n", b"next\n"):
        log.append(piece)
    lines, _ = log.read_lines(0)
    assert [line.text for line in lines] == [b"0123456789abcdefghijKLMNO", b"next"]


def test_chunks_that_end_mid_line_still_rotate_at_line_boundaries(tmp_path: Path) -> None:
    # The pump appends what the VMM wrote, in chunks that rarely end with a line: rotation must
    # still happen near the segment size, and never inside a line.
    log = SegmentedLog(tmp_path, "app", segment_bytes=1000, keep=1000)
    data = b"".join(b"%019d\n" % n for n in range(2000))
    for start in range(0, len(data), 333):
        log.append(data[start : start + 333])
    segments = sorted(tmp_path.glob("app-*.log"))
    assert len(segments) > 30, "segments of about 1000 bytes, not one per twice the size"
    for segment in segments:
        assert segment.read_bytes().endswith(b"\n") or segment == segments[-1]
        assert segment.stat().st_size < 1000 + 333
    lines, _ = log.read_lines(0)
    assert [line.text for line in lines] == data.splitlines()


def test_tail_zero_starts_after_the_last_complete_line(tmp_path: Path) -> None:
    log = SegmentedLog(tmp_path, "app")
    log.append(b"done\npartial")
    assert log.tail(0) == ([], 5)
    assert [line.text for line in log.tail(1, final=True)[0]] == [b"partial"]


@pytest.mark.anyio
async def test_one_pump_set_follows_every_instance_until_each_is_removed(tmp_path: Path) -> None:
    def app_lines(folder: Path) -> list[bytes]:
        return lines_text(SegmentedLog(folder / "logs", "app").read_lines(0)[0])

    async def until(condition: Callable[[], bool]) -> None:
        with anyio.fail_after(10):
            while not condition():  # noqa: ASYNC110 - the pump set wakes nobody
                await anyio.sleep(0.01)

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    pumps = PumpSet(poll_seconds=0.01, booting_poll_seconds=0.01)
    pumps.add("one", pump_in(one))
    pumps.add("two", pump_in(two))
    async with anyio.create_task_group() as tg:
        tg.start_soon(pumps.run)
        (one / "output.raw").write_bytes(b"a1\n")
        (two / "output.raw").write_bytes(b"b1\n")
        await until(lambda: app_lines(one) == [b"a1"])
        await until(lambda: app_lines(two) == [b"b1"])

        await pumps.remove("one")
        assert "one" not in pumps
        with (one / "output.raw").open("ab") as handle:
            handle.write(b"a2\n")
        with (two / "output.raw").open("ab") as handle:
            handle.write(b"b2\n")
        await until(lambda: app_lines(two) == [b"b1", b"b2"])
        assert app_lines(one) == [b"a1"]
        tg.cancel_scope.cancel()


class _StubPump:
    """A pump whose drain can be held in the worker thread, or made to fail."""

    booting = False

    def __init__(self, *, hold: bool = False, fail: bool = False) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.fail = fail
        self.drains = 0

    def drain(self, *, whole: bool = True) -> bool:
        self.drains += 1
        self.entered.set()
        self.release.wait(10)
        if self.fail:
            raise OSError("No space left on device")
        return False


@pytest.mark.anyio
async def test_remove_waits_for_its_own_drain_only(caplog: pytest.LogCaptureFixture) -> None:
    pumps = PumpSet(poll_seconds=0.005, booting_poll_seconds=0.005)
    held, broken, steady = _StubPump(hold=True), _StubPump(fail=True), _StubPump()
    pumps.add("held", held)
    pumps.add("broken", broken)
    pumps.add("steady", steady)
    removed = anyio.Event()

    async def remove_held() -> None:
        await pumps.remove("held")
        removed.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(pumps.run)
        await anyio.to_thread.run_sync(held.entered.wait, 10)
        # Held up in the same batch, another pump's removal does not wait for it.
        with anyio.fail_after(1):
            await pumps.remove("steady")
        tg.start_soon(remove_held)
        await anyio.sleep(0.05)
        assert not removed.is_set(), "returned while its drain was still running"
        drains = held.drains
        held.release.set()
        with anyio.fail_after(5):
            await removed.wait()
        # The broken pump keeps failing; it is reported once, and passes go on.
        before = broken.drains
        with anyio.fail_after(5):
            while broken.drains < before + 3:  # noqa: ASYNC110 - counted in the worker
                await anyio.sleep(0.01)
        assert held.drains == drains, "drained after its removal returned"
        tg.cancel_scope.cancel()
    failures = [r for r in caplog.records if r.getMessage() == "log pump failed"]
    assert len(failures) == 1


def test_a_resume_inside_a_line_starts_at_the_next_line(tmp_path: Path) -> None:
    log = SegmentedLog(tmp_path, "app")
    log.append(b"alpha\nbeta\ngamma\n")
    assert log.resume(0).offset == 0
    assert log.resume(6).offset == 6  # a boundary: "beta" starts there
    assert log.resume(5).offset == 6  # the newline itself: beta is next
    assert log.resume(2).offset == 6
    assert log.resume(8).offset == 11
    lines, _ = log.read_lines(log.resume(8).offset)
    assert lines_text(lines) == [b"gamma"]
    assert log.resume(10_000).offset == log.end()


def test_a_resume_inside_a_cut_line_starts_at_its_next_piece(tmp_path: Path) -> None:
    log = SegmentedLog(tmp_path, "app", segment_bytes=1 << 30)
    log.append(b"x\n" + b"y" * (2 * MAX_LINE + 10) + b"\nz\n")
    pieces, _ = log.read_lines(0)
    ids = [line.offset for line in pieces]
    # Every id a reader was given is a boundary and resumes right there.
    assert all(log.resume(offset).offset == offset for offset in ids)
    assert log.resume(2 + 5).offset == 2 + MAX_LINE
    assert log.resume(2 + MAX_LINE + 1).offset == 2 + 2 * MAX_LINE
    assert log.resume(2 + 2 * MAX_LINE + 3).offset == ids[-2]  # the end of the line


def test_a_resume_from_a_rotated_offset_says_what_is_gone(tmp_path: Path) -> None:
    log = SegmentedLog(tmp_path, "app", segment_bytes=100, keep=2)
    for n in range(100):
        log.append(f"{n:04d}\n".encode())
    oldest = log.start()
    resumed = log.resume(10)
    assert (resumed.offset, resumed.dropped) == (oldest, oldest - 10)
    assert log.resume(oldest).dropped == 0


def test_retention_sets_segments_and_bounds_the_size(tmp_path: Path) -> None:
    log = SegmentedLog(tmp_path, "app", retention_bytes=1 << 20)
    assert log.keep * log.segment_bytes <= 1 << 20
    assert log.keep >= 4
    line = b"z" * 99 + b"\n"
    for _ in range(30_000):  # 3 MB through a 1 MiB retention
        log.append(line)
    kept = sum(f.stat().st_size for f in tmp_path.glob("app-*.log"))
    assert kept <= (1 << 20) + log.segment_bytes
    assert log.end() == 30_000 * 100
