"""The host's agent client against the real agent, built standalone and run on this host.

The agent is the C code that runs in every guest (``managers/guest/init/agent.c``), compiled
with ``-DAGENT_STANDALONE`` so it listens on a Unix socket instead of a virtio port or vsock.
Every operation goes through the real framing, flow control and process handling; only the
transport differs from a guest. A hostile peer (a Python stand-in that breaks the protocol on
purpose) checks what the host does when the guest misbehaves.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import socket
import struct
import subprocess
import tarfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from anyio.abc import ByteStream, TaskGroup

from managers.agent import (
    AgentDisconnected,
    AgentError,
    AgentProtocolError,
    Channel,
    ExecFailed,
    ExecResult,
    ExecSpec,
    FileType,
    GuestPathNotFound,
    InvalidGuestPath,
    TtySize,
    interactive_exec,
    read_file,
    run_exec,
    stat,
    write_file,
)
from managers.agent import protocol as p
from managers.agent.operations import set_time
from managers.guest.initrd import compile_standalone_agent
from managers.hypervisors.agent_socket import UnixStream

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def agent_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The standalone agent, listening on a Unix socket, stopped by PID at the end."""
    tmp = tmp_path_factory.mktemp("agent")
    binary = anyio.run(compile_standalone_agent, tmp / "agent")
    socket = tmp / "agent.sock"
    workdir = tmp / "work"
    workdir.mkdir()
    process = subprocess.Popen(
        [str(binary), "--listen-unix", str(socket), "--workdir", str(workdir),
         "--env", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "--env", "FROM_IMAGE=yes"],
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not socket.exists():
            assert process.poll() is None, "the agent exited at start"
            assert time.monotonic() < deadline, "the agent never listened"
            time.sleep(0.01)
        yield socket
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


@pytest.fixture
async def channel(agent_socket: Path) -> AsyncIterator[Channel]:
    stream = await UnixStream.connect(agent_socket)
    channel = Channel(stream)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(channel.run)
        with anyio.fail_after(10):
            await channel.wait_ready()
        yield channel
        await channel.close("test over")


def sh(script: str, env: dict[str, str] | None = None) -> ExecSpec:
    return ExecSpec(command=("sh", "-c", script), env=env or {})


async def execute(
    channel: Channel, spec: ExecSpec, stdin: bytes | None = None, seconds: float = 20
) -> ExecResult:
    return await run_exec(channel, spec, stdin=stdin, timeout_seconds=seconds, output_limit=1 << 20)


async def test_hello_names_the_agent(channel: Channel) -> None:
    assert channel.hello is not None
    assert channel.hello.version == p.VERSION
    assert channel.hello.agent
    await channel.ping(b"x" * 100)


async def test_exit_codes_and_streams_are_kept_apart(channel: Channel) -> None:
    result = await execute(channel, sh("echo out; echo err >&2; exit 3"))
    assert (result.exit_code, result.signal, result.timed_out) == (3, None, False)
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"
    killed = await execute(channel, sh("kill -TERM $$"))
    assert (killed.exit_code, killed.signal) == (None, signal.SIGTERM)


async def test_stdin_env_and_workdir(channel: Channel, tmp_path: Path) -> None:
    data = bytes(range(256)) * 64
    result = await execute(channel, ExecSpec(command=("cat",)), stdin=data)
    assert result.stdout == data
    env = await execute(channel, sh('echo "$FROM_IMAGE $MINE"', env={"MINE": "a b=c"}))
    assert env.stdout == b"yes a b=c\n"
    where = await execute(channel, ExecSpec(command=("pwd",), workdir=str(tmp_path)))
    assert where.stdout.decode().strip() == str(tmp_path)


async def test_a_timeout_kills_the_process_group(channel: Channel, tmp_path: Path) -> None:
    marker = tmp_path / "survivor"
    began = time.monotonic()
    result = await execute(channel, sh(f"(sleep 3; touch {marker}) & sleep 30"), seconds=0.5)
    assert result.timed_out
    assert result.exit_code is None
    assert time.monotonic() - began < 10
    await anyio.sleep(3.5)
    assert not marker.exists(), "a process of the timed-out group lived on"


async def test_a_missing_program_or_user_is_an_exec_failure(channel: Channel) -> None:
    with pytest.raises(ExecFailed) as missing:
        await execute(channel, ExecSpec(command=("/no/such/program",)))
    assert missing.value.details["errno"] == "ENOENT"
    with pytest.raises(ExecFailed):
        await execute(channel, ExecSpec(command=("true",), user="no-such-user"))
    with pytest.raises(ExecFailed):
        await execute(channel, ExecSpec(command=("true",), workdir="/no/such/dir"))


async def test_output_beyond_the_cap_is_read_and_dropped(channel: Channel) -> None:
    result = await execute(channel, sh("head -c 3000000 /dev/zero; echo done >&2"))
    assert result.exit_code == 0
    assert len(result.stdout) == 1 << 20
    assert result.stdout_truncated
    assert result.stderr == b"done\n"
    assert not result.stderr_truncated


async def test_concurrent_execs_share_the_channel(channel: Channel) -> None:
    results: dict[int, bytes] = {}

    async def one(index: int) -> None:
        result = await execute(channel, sh(f"sleep 0.2; echo {index}"))
        results[index] = result.stdout

    async with anyio.create_task_group() as tasks:
        for index in range(20):
            tasks.start_soon(one, index)
    assert results == {i: f"{i}\n".encode() for i in range(20)}


async def test_file_round_trip_and_stat(channel: Channel, tmp_path: Path) -> None:
    payload = os.urandom(1 << 20)
    target = str(tmp_path / "blob.bin")

    async def chunks() -> AsyncIterator[bytes]:
        for offset in range(0, len(payload), 100_000):
            yield payload[offset : offset + 100_000]

    assert await write_file(channel, target, 0o640, chunks()) == len(payload)
    info = await stat(channel, target)
    assert (info.type, info.size, info.mode) == (FileType.FILE, len(payload), 0o640)
    digest = hashlib.sha256()
    async with read_file(channel, target) as (head, data):
        assert head.type is FileType.FILE
        async for chunk in data:
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()
    left = await anyio.to_thread.run_sync(lambda: sorted(e.name for e in tmp_path.iterdir()))
    assert left == ["blob.bin"], "a temporary file stayed"


async def test_a_directory_comes_as_a_tar(channel: Channel, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("alpha")
    (tree / "sub" / ("long-" + "x" * 150)).write_text("deep")
    (tree / "link").symlink_to("a.txt")
    buffer = io.BytesIO()
    async with read_file(channel, str(tree)) as (head, data):
        assert head.type is FileType.DIRECTORY
        async for chunk in data:
            buffer.write(chunk)
    buffer.seek(0)
    with tarfile.open(fileobj=buffer) as archive:
        names = {m.name.rstrip("/").removeprefix("./") for m in archive.getmembers()}
        assert {"a.txt", "sub", "link", "sub/long-" + "x" * 150} <= names
        link = next(m for m in archive.getmembers() if m.name.endswith("link"))
        assert link.issym()
        assert link.linkname == "a.txt"
        member = next(m for m in archive.getmembers() if m.name.endswith("a.txt"))
        extracted = archive.extractfile(member)
        assert extracted is not None
        assert extracted.read() == b"alpha"


async def test_stat_describes_without_following(channel: Channel, tmp_path: Path) -> None:
    (tmp_path / "target").write_text("x")
    (tmp_path / "link").symlink_to("target")
    link = await stat(channel, str(tmp_path / "link"))
    assert (link.type, link.link_target) == (FileType.SYMLINK, "target")
    folder = await stat(channel, str(tmp_path))
    assert folder.type is FileType.DIRECTORY
    with pytest.raises(GuestPathNotFound):
        await stat(channel, str(tmp_path / "absent"))
    with pytest.raises(InvalidGuestPath):
        await stat(channel, "relative/path")
    with pytest.raises(GuestPathNotFound):
        async with read_file(channel, str(tmp_path / "absent")):
            pass


async def test_writing_into_a_missing_folder_fails_and_leaves_nothing(
    channel: Channel, tmp_path: Path
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"data"

    with pytest.raises(GuestPathNotFound):
        await write_file(channel, str(tmp_path / "no" / "file"), 0o644, chunks())


async def test_an_interactive_tty_session(channel: Channel) -> None:
    spec = ExecSpec(command=("sh",), tty=TtySize(rows=40, cols=100))
    output = bytearray()
    async with interactive_exec(channel, spec) as process:
        await process.write(b"stty size; echo hel''lo; exit 7\n")
        async for kind, item in process.output():
            if kind == "exit":
                ended = item
                break
            assert kind == "stdout"
            assert isinstance(item, bytes)
            output += item
    assert b"40 100" in output
    assert b"hello" in output
    assert ended.exit_code == 7  # type: ignore[union-attr]


async def test_set_time_is_answered(channel: Channel) -> None:
    # The standalone agent answers without touching this host's clock.
    await set_time(channel, time.time_ns())


# -- a guest that breaks the protocol ---------------------------------------------------------


class HostilePeer:
    """A stand-in for a broken or hostile agent, on one end of a socket pair."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.received = bytearray()

    async def read_frame(self) -> tuple[int, int, bytes]:
        while len(self.received) < p.HEADER_SIZE:
            self.received += await self.stream.receive()
        _, kind, _, _, stream, length = p.HEADER.unpack_from(self.received)
        while len(self.received) < p.HEADER_SIZE + length:
            self.received += await self.stream.receive()
        payload = bytes(self.received[p.HEADER_SIZE : p.HEADER_SIZE + length])
        del self.received[: p.HEADER_SIZE + length]
        return kind, stream, payload

    async def answer_hello(self, *, garbage: bytes = b"") -> None:
        kind, _, payload = await self.read_frame()
        assert kind == p.Msg.HELLO
        nonce = p.Fields.parse(payload).raw(p.Tag.NONCE)
        assert nonce is not None
        wrong = p.encode(p.Msg.HELLO_OK, 0, p.record(p.Tag.NONCE, b"\0" * 8))
        right = p.encode(
            p.Msg.HELLO_OK,
            0,
            p.records(
                [
                    p.record(p.Tag.NONCE, nonce),
                    p.u32(p.Tag.VERSION, 1),
                    p.text(p.Tag.AGENT, "hostile"),
                ]
            ),
        )
        await self.stream.send(garbage + wrong + right)


async def peer_pair() -> tuple[Channel, HostilePeer]:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    host = await UnixStream.from_socket(left)
    guest = await UnixStream.from_socket(right)
    return Channel(host), HostilePeer(guest)


@contextlib.asynccontextmanager
async def synced_peer() -> AsyncIterator[tuple[Channel, HostilePeer, TaskGroup]]:
    """A channel past its handshake with a hostile peer, its reader running in ``tasks``."""
    channel, peer = await peer_pair()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(channel.run)
        await peer.answer_hello()
        await channel.wait_ready()
        yield channel, peer, tasks


async def test_the_host_resynchronises_past_garbage_and_stale_answers() -> None:
    channel, peer = await peer_pair()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(channel.run)
        await peer.answer_hello(garbage=b"DPGA\x83half a frame from before the restore" * 3)
        with anyio.fail_after(5):
            hello = await channel.wait_ready()
        assert hello.agent == "hostile"
        await channel.close("done")


async def test_a_guest_that_ignores_its_window_is_cut_off() -> None:
    async with synced_peer() as (channel, peer, tasks):

        async def flood() -> None:
            kind, stream, _ = await peer.read_frame()
            assert kind == p.Msg.EXEC
            await peer.stream.send(p.encode(p.Msg.STARTED, stream, p.u32(p.Tag.PID, 1)))
            chunk = p.encode(p.Msg.DATA_OUT, stream, b"x" * p.MAX_PAYLOAD)
            for _ in range(p.WINDOW // p.MAX_PAYLOAD + 2):
                await peer.stream.send(chunk)

        tasks.start_soon(flood)
        with pytest.raises(AgentDisconnected, match="broke the protocol"), anyio.fail_after(10):
            await execute(channel, ExecSpec(command=("flood",)))
        assert channel.closed.is_set()


async def test_oversized_frames_are_refused() -> None:
    async with synced_peer() as (channel, peer, _):
        header = p.HEADER.pack(p.MAGIC, p.Msg.DATA_OUT, 0, 0, 1, p.MAX_PAYLOAD + 1)
        await peer.stream.send(header)
        with anyio.fail_after(5):
            await channel.closed.wait()


def test_records_round_trip_and_reject_truncation() -> None:
    payload = p.records([p.text(p.Tag.ARG, "a\nb"), p.u32(p.Tag.MODE, 0o755)])
    fields = p.Fields.parse(payload)
    assert fields.text(p.Tag.ARG) == "a\nb"
    assert fields.u32(p.Tag.MODE) == 0o755
    with pytest.raises(p.ProtocolError):
        p.Fields.parse(payload[:-1])
    with pytest.raises(ValueError, match="NUL"):
        p.text(p.Tag.ARG, "a\0b")
    assert struct.calcsize("<4sBBHII") == p.HEADER_SIZE == 16


async def test_a_malformed_answer_is_a_protocol_error_not_a_crash() -> None:
    async with synced_peer() as (channel, peer, tasks):

        async def answer_badly() -> None:
            kind, stream, _ = await peer.read_frame()
            assert kind == p.Msg.STAT
            short_errno = p.record(p.Tag.ERRNO, b"\x02")
            await peer.stream.send(p.encode(p.Msg.ERROR, stream, short_errno))

        tasks.start_soon(answer_badly)
        with pytest.raises(AgentProtocolError), anyio.fail_after(5):
            await stat(channel, "/etc")
        await channel.close("done")


async def test_a_guest_flooding_control_frames_is_cut_off() -> None:
    async with synced_peer() as (channel, peer, tasks):

        async def flood() -> None:
            _, stream, _ = await peer.read_frame()
            started = p.encode(p.Msg.STARTED, stream, p.u32(p.Tag.PID, 1))
            await peer.stream.send(started * 50)

        async def consume() -> None:
            async with interactive_exec(channel, ExecSpec(command=("x",))) as process:
                async for _ in process.output():
                    pass

        tasks.start_soon(flood)
        with pytest.raises(AgentError), anyio.fail_after(10):
            await consume()
        with anyio.fail_after(5):
            await channel.closed.wait()


def test_resynchronisation_ignores_oversized_hello_answers() -> None:
    nonce = b"n" * 8
    decoder = p.Decoder(nonce)
    padded = p.records([p.record(p.Tag.NONCE, nonce), p.record(p.Tag.MESSAGE, b"x" * 400)])
    assert decoder.feed(p.encode(p.Msg.HELLO_OK, 0, padded)) == []
    assert not decoder.synced
    right = p.records([p.record(p.Tag.NONCE, nonce), p.u32(p.Tag.VERSION, 1)])
    frames = decoder.feed(b"DPGA" * 5 + p.encode(p.Msg.HELLO_OK, 0, right))
    assert [f.type for f in frames] == [p.Msg.HELLO_OK]
    assert decoder.synced
