"""What the host asks of an agent, each as one session on a :class:`~.channel.Channel`."""

from __future__ import annotations

import contextlib
import signal as signals
import struct
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

import anyio

from . import protocol as p
from .channel import Channel, Session, time_record
from .errors import (
    AgentError,
    AgentProtocolError,
    AgentUnavailable,
    ExecFailed,
    GuestOperationFailed,
    guest_error,
)
from .protocol import Fields, Frame, Msg, Tag
from .types import FILE_TYPES, ExecExit, ExecResult, ExecSpec, FileStat, FileType

# After a timeout's SIGKILL, how long the agent gets to report the exit before we give up on it.
_KILL_REPORT_SECONDS = 5.0
# How long the agent may take to answer a request that runs nothing of the user's (stat, the
# clock, the start of a file transfer, the end of an upload).
ANSWER_SECONDS = 60.0
_STAT = struct.Struct("<BIIIQqI")


def _error(frame: Frame, path: str | None = None, *, exec_: bool = False) -> GuestOperationFailed:
    fields = Fields.parse(frame.payload)
    errno = fields.u32(Tag.ERRNO) or 0
    message = fields.text(Tag.MESSAGE) or "the agent refused the operation"
    if exec_:
        return ExecFailed(message, errno)
    return guest_error(message, errno, path)


def _unexpected(frame: Frame, what: str) -> AgentProtocolError:
    return AgentProtocolError(f"the agent answered {frame.type.name} to {what}")


def exec_payload(spec: ExecSpec) -> bytes:
    items = [p.text(Tag.ARG, arg) for arg in spec.command]
    items += [p.text(Tag.ENV, f"{name}={value}") for name, value in spec.env.items()]
    if spec.workdir is not None:
        items.append(p.text(Tag.WORKDIR, spec.workdir))
    if spec.user is not None:
        items.append(p.text(Tag.USER, spec.user))
    if spec.tty is not None:
        items.append(p.record(Tag.TTY, struct.pack("<HH", spec.tty.rows, spec.tty.cols)))
    return p.records(items)


async def _answer(session: Session, what: str) -> Frame:
    """The agent's next frame on ``session``, within :data:`ANSWER_SECONDS`."""
    with anyio.move_on_after(ANSWER_SECONDS):
        return await session.receive()
    raise AgentUnavailable(f"the agent did not answer {what} within {ANSWER_SECONDS:g} s")


def exit_of(frame: Frame) -> ExecExit:
    fields = Fields.parse(frame.payload)
    return ExecExit(fields.u32(Tag.EXIT_CODE), fields.u32(Tag.EXIT_SIGNAL))


async def _started(session: Session) -> int:
    frame = await session.receive()
    if frame.type is Msg.ERROR:
        raise _error(frame, exec_=True)
    if frame.type is not Msg.STARTED:
        raise _unexpected(frame, "EXEC")
    return Fields.parse(frame.payload).u32(Tag.PID) or 0


@dataclass(slots=True)
class _Capture:
    limit: int
    data: bytearray
    truncated: bool = False

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.truncated = True
        self.data += chunk[: max(room, 0)]


async def run_exec(
    channel: Channel,
    spec: ExecSpec,
    *,
    stdin: bytes | None,
    timeout_seconds: float,
    output_limit: int,
) -> ExecResult:
    """Run a command to completion, keeping at most ``output_limit`` bytes of each output.

    At ``timeout_seconds`` (counted from the request, start included) the process group is
    killed and the result says ``timed_out``."""
    began = time.monotonic()
    deadline = anyio.current_time() + timeout_seconds
    stdout = _Capture(output_limit, bytearray())
    stderr = _Capture(output_limit, bytearray())
    ended: ExecExit | None = None
    async with channel.session() as session:
        started = False
        with anyio.CancelScope(deadline=deadline):
            await session.send(Msg.EXEC, exec_payload(spec))
            await _started(session)
            started = True

        async def feed() -> None:
            # A channel that fails here fails the collection too, which reports it.
            with contextlib.suppress(AgentError):
                if stdin:
                    await session.send_data(stdin)
                await session.end_input()

        async def collect() -> ExecExit:
            while True:
                frame = await session.receive()
                if frame.type in (Msg.DATA_OUT, Msg.STDERR):
                    (stdout if frame.type is Msg.DATA_OUT else stderr).add(frame.payload)
                    await session.consumed(len(frame.payload))
                elif frame.type is Msg.EXIT:
                    return exit_of(frame)
                elif frame.type is Msg.ERROR:
                    raise _error(frame, exec_=True)
                else:
                    raise _unexpected(frame, "EXEC")

        failure: Exception | None = None
        if started:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(feed)
                try:
                    with anyio.CancelScope(deadline=deadline):
                        ended = await collect()
                    if ended is None:
                        await session.send(Msg.SIGNAL, p.u32(Tag.SIGNAL, signals.SIGKILL))
                        with anyio.move_on_after(_KILL_REPORT_SECONDS):
                            await collect()
                except Exception as error:
                    # Raised outside the task group, so callers see it and not a group of one.
                    failure = error
                tasks.cancel_scope.cancel()
        # A command that never started within the deadline is abandoned: leaving the session
        # sends CLOSE, which kills it should it start after all.
        if failure is not None:
            raise failure
    return ExecResult(
        exit_code=ended.exit_code if ended is not None else None,
        signal=ended.signal if ended is not None else None,
        stdout=bytes(stdout.data),
        stderr=bytes(stderr.data),
        stdout_truncated=stdout.truncated,
        stderr_truncated=stderr.truncated,
        timed_out=ended is None,
        duration_ms=round((time.monotonic() - began) * 1000, 3),
    )


class InteractiveExec:
    """A running exec driven frame by frame (the WebSocket's side).

    :meth:`output` yields ``("stdout" | "stderr", bytes)`` and finally ``("exit", ExecExit)``.
    """

    def __init__(self, session: Session, pid: int) -> None:
        self._session = session
        self.pid = pid

    async def write(self, data: bytes) -> None:
        await self._session.send_data(data)

    async def close_input(self) -> None:
        await self._session.end_input()

    async def signal(self, number: int) -> None:
        await self._session.send(Msg.SIGNAL, p.u32(Tag.SIGNAL, number))

    async def resize(self, rows: int, cols: int) -> None:
        await self._session.send(Msg.RESIZE, p.record(Tag.TTY, struct.pack("<HH", rows, cols)))

    async def output(self) -> AsyncIterator[tuple[str, bytes | ExecExit]]:
        async for frame in self._session.frames():
            if frame.type in (Msg.DATA_OUT, Msg.STDERR):
                yield ("stdout" if frame.type is Msg.DATA_OUT else "stderr"), frame.payload
                await self._session.consumed(len(frame.payload))
            elif frame.type is Msg.EXIT:
                yield "exit", exit_of(frame)
            elif frame.type is Msg.ERROR:
                raise _error(frame, exec_=True)
            else:
                raise _unexpected(frame, "EXEC")


@contextlib.asynccontextmanager
async def interactive_exec(channel: Channel, spec: ExecSpec) -> AsyncIterator[InteractiveExec]:
    """Start ``spec``; leaving the block before its exit kills it (CLOSE)."""
    async with channel.session() as session:
        await session.send(Msg.EXEC, exec_payload(spec))
        pid = await _started(session)
        yield InteractiveExec(session, pid)


def _stat_of(path: str, frame: Frame) -> FileStat:
    fields = Fields.parse(frame.payload)
    raw = fields.raw(Tag.STAT)
    if raw is None or len(raw) != _STAT.size:
        raise AgentProtocolError("the agent's STAT_RESULT has no valid STAT record")
    kind, mode, uid, gid, size, seconds, nanos = _STAT.unpack(raw)
    file_type = FILE_TYPES.get(kind)
    if file_type is None:
        raise AgentProtocolError(f"the agent reported an unknown file type {kind}")
    return FileStat(
        path=path,
        type=file_type,
        size=size,
        mode=mode & 0o7777,
        uid=uid,
        gid=gid,
        mtime_ns=seconds * 1_000_000_000 + nanos,
        link_target=fields.text(Tag.LINK),
    )


async def stat(channel: Channel, path: str) -> FileStat:
    async with channel.session() as session:
        await session.send(Msg.STAT, p.text(Tag.PATH, path))
        frame = await _answer(session, "STAT")
        if frame.type is Msg.ERROR:
            raise _error(frame, path)
        if frame.type is not Msg.STAT_RESULT:
            raise _unexpected(frame, "STAT")
        session.ended = True
        return _stat_of(path, frame)


async def set_time(channel: Channel, realtime_ns: int) -> None:
    async with channel.session() as session:
        await session.send(Msg.SET_TIME, time_record(realtime_ns))
        frame = await _answer(session, "SET_TIME")
        if frame.type is Msg.ERROR:
            raise _error(frame)
        if frame.type is not Msg.DONE:
            raise _unexpected(frame, "SET_TIME")


async def mount(channel: Channel, device: str, path: str, *, readonly: bool) -> None:
    """Mount the disk whose virtio serial is ``device`` at ``path`` (made if missing).

    The agent waits (bounded) for a disk that was just hot-plugged to appear; a disk already
    mounted there is success, so a retry after a lost answer is harmless.
    """
    payload = p.records(
        [
            p.text(Tag.DEVICE, device),
            p.text(Tag.PATH, path),
            p.record(Tag.READONLY, b"\x01" if readonly else b"\x00"),
        ]
    )
    await _done(channel, Msg.MOUNT, payload, path)


async def umount(channel: Channel, device: str, path: str) -> None:
    """Sync and unmount the disk ``device`` from ``path``; nothing mounted there is success.

    Files held open there make it fail with ``EBUSY`` and leave the mount as it was.
    """
    payload = p.records([p.text(Tag.DEVICE, device), p.text(Tag.PATH, path)])
    await _done(channel, Msg.UMOUNT, payload, path)


async def _done(channel: Channel, kind: Msg, payload: bytes, path: str) -> None:
    async with channel.session() as session:
        await session.send(kind, payload)
        frame = await _answer(session, kind.name)
        if frame.type is Msg.ERROR:
            raise _error(frame, path)
        if frame.type is not Msg.DONE:
            raise _unexpected(frame, kind.name)


async def write_file(channel: Channel, path: str, mode: int, chunks: AsyncIterable[bytes]) -> int:
    """Stream ``chunks`` into ``path`` (replaced whole, atomically); returns the size written."""
    written = 0
    async with channel.session() as session:
        await session.send(
            Msg.WRITE_FILE, p.records([p.text(Tag.PATH, path), p.u32(Tag.MODE, mode)])
        )
        failure: list[Exception] = []
        done = anyio.Event()

        async def watch() -> None:
            # The agent may refuse before we finish sending (no such folder): stop early.
            try:
                frame = await session.receive()
                if frame.type is Msg.ERROR:
                    failure.append(_error(frame, path))
                elif frame.type is not Msg.DONE:
                    failure.append(_unexpected(frame, "WRITE_FILE"))
            except AgentError as error:
                failure.append(error)
            done.set()
            if failure:
                tasks.cancel_scope.cancel()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(watch)
            try:
                async for chunk in chunks:
                    if chunk:
                        await session.send_data(chunk)
                        written += len(chunk)
                await session.end_input()
                with anyio.move_on_after(ANSWER_SECONDS):
                    await done.wait()
                if not done.is_set():
                    raise AgentUnavailable(
                        f"the agent did not confirm the upload within {ANSWER_SECONDS:g} s"
                    )
            except Exception as error:
                # The upload's source may fail too (its client went away): raised as itself,
                # outside the task group, not as a group of one.
                failure.append(error)
                tasks.cancel_scope.cancel()
        if failure:
            raise failure[0]
    return written


@contextlib.asynccontextmanager
async def read_file(
    channel: Channel, path: str
) -> AsyncIterator[tuple[FileStat, AsyncIterator[bytes]]]:
    """The file's stat and its bytes (a tar for a directory), read as they are consumed."""
    async with channel.session() as session:
        await session.send(Msg.READ_FILE, p.text(Tag.PATH, path))
        frame = await _answer(session, "READ_FILE")
        if frame.type is Msg.ERROR:
            raise _error(frame, path)
        if frame.type is not Msg.STAT_RESULT:
            raise _unexpected(frame, "READ_FILE")
        info = _stat_of(path, frame)
        if info.type not in (FileType.FILE, FileType.DIRECTORY):
            raise AgentProtocolError(f"the agent streams a {info.type} for READ_FILE")

        async def chunks() -> AsyncIterator[bytes]:
            async for item in session.frames():
                if item.type is Msg.DATA_OUT:
                    yield item.payload
                    await session.consumed(len(item.payload))
                elif item.type is Msg.ERROR:
                    raise _error(item, path)
                elif item.type is not Msg.DONE:
                    raise _unexpected(item, "READ_FILE")

        yield info, chunks()
