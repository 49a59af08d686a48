"""MOUNT and UMOUNT against the real agent, built standalone and run on this host.

The standalone agent must never mount anything on the host: it keeps a table of (disk, path) in
memory and answers as a guest does (see PROTOCOL.md, "Mounts"). What these tests check is the
part a guest shares with it: the path rules, idempotency, EBUSY for another disk, and the
host's client (``managers.agent.operations.mount``/``umount``). The real mount, a hot-plugged
disk and a busy volume need a guest (QEMU).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import anyio
import pytest

from managers.agent import Channel, GuestOperationFailed, InvalidGuestPath
from managers.agent import protocol as p
from managers.agent.operations import mount, umount
from managers.agent.protocol import Fields, Msg, Tag
from managers.guest.initrd import compile_standalone_agent
from managers.hypervisors.agent_socket import UnixStream

pytestmark = pytest.mark.anyio

BAD_PATHS = ["relative", "", "/", "//", "/.", "/proc/x", "/proc", "/sys", "/dev/vdb", "/a/../b",
             "/a/..", "//proc/x", "/./sys/kernel", "/data/./../etc"]  # fmt: skip


@pytest.fixture(scope="module")
def agent_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The standalone agent, listening on a Unix socket, stopped by PID at the end."""
    tmp = tmp_path_factory.mktemp("agent")
    binary = anyio.run(compile_standalone_agent, tmp / "agent")
    socket = tmp / "agent.sock"
    process = subprocess.Popen([str(binary), "--listen-unix", str(socket)], start_new_session=True)
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


async def test_mount_is_idempotent_and_never_touches_the_host(
    channel: Channel, tmp_path: Path
) -> None:
    target = tmp_path / "not-made" / "data"
    await mount(channel, "vol-idem", str(target), readonly=False)
    await mount(channel, "vol-idem", str(target), readonly=False)  # a retry: DONE again
    # The same mount point spelt another way is the same entry.
    await mount(channel, "vol-idem", f"{target}/./", readonly=True)
    assert not target.parent.exists(), "the standalone agent made a directory on the host"
    await umount(channel, "vol-idem", str(target))


async def test_another_disk_at_the_same_path_is_busy(channel: Channel) -> None:
    await mount(channel, "vol-first", "/srv/busy", readonly=False)
    with pytest.raises(GuestOperationFailed) as caught:
        await mount(channel, "vol-second", "/srv//busy/", readonly=True)
    assert caught.value.errno == errno.EBUSY
    assert not isinstance(caught.value, InvalidGuestPath)
    assert "vol-first" in str(caught.value)
    # UMOUNT of the other disk finds nothing of its own there: DONE, and the first stays.
    await umount(channel, "vol-second", "/srv/busy")
    with pytest.raises(GuestOperationFailed) as again:
        await mount(channel, "vol-second", "/srv/busy", readonly=False)
    assert again.value.errno == errno.EBUSY
    await umount(channel, "vol-first", "/srv/busy")
    await mount(channel, "vol-second", "/srv/busy", readonly=False)
    await umount(channel, "vol-second", "/srv/busy")


async def test_umount_twice_is_done(channel: Channel) -> None:
    await mount(channel, "vol-twice", "/mnt/twice", readonly=False)
    await umount(channel, "vol-twice", "/mnt/twice")
    await umount(channel, "vol-twice", "/mnt/twice")
    await umount(channel, "vol-never", "/mnt/never-mounted")


async def test_the_table_outlives_the_connection(agent_socket: Path) -> None:
    for attempt in range(2):
        stream = await UnixStream.connect(agent_socket)
        channel = Channel(stream)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(channel.run)
            with anyio.fail_after(10):
                await channel.wait_ready()
            if attempt == 0:
                await mount(channel, "vol-kept", "/kept", readonly=False)
            else:
                with pytest.raises(GuestOperationFailed) as caught:
                    await mount(channel, "vol-other", "/kept", readonly=False)
                assert caught.value.errno == errno.EBUSY
                await umount(channel, "vol-kept", "/kept")
            await channel.close("next connection")


@pytest.mark.parametrize("path", BAD_PATHS)
async def test_bad_paths_are_invalid(channel: Channel, path: str) -> None:
    with pytest.raises(InvalidGuestPath) as caught:
        await mount(channel, "vol-bad", path, readonly=False)
    assert caught.value.errno == errno.EINVAL
    with pytest.raises(InvalidGuestPath) as unmounted:
        await umount(channel, "vol-bad", path)
    assert unmounted.value.errno == errno.EINVAL


@pytest.mark.parametrize("path", ["/procs", "/system", "/devices/x", "/data/..x", "/a/.b"])
async def test_names_that_merely_look_alike_are_fine(channel: Channel, path: str) -> None:
    await mount(channel, "vol-alike", path, readonly=False)
    await umount(channel, "vol-alike", path)


async def test_an_empty_device_is_invalid(channel: Channel) -> None:
    with pytest.raises(InvalidGuestPath) as caught:
        await mount(channel, "", "/data", readonly=False)
    assert caught.value.errno == errno.EINVAL
    assert "DEVICE" in str(caught.value)


async def raw_answer(channel: Channel, kind: Msg, payload: bytes) -> tuple[Msg, int | None]:
    async with channel.session() as session:
        await session.send(kind, payload)
        with anyio.fail_after(10):
            frame = await session.receive()
        return frame.type, Fields.parse(frame.payload).u32(Tag.ERRNO)


async def test_malformed_requests_get_einval(channel: Channel) -> None:
    path = p.text(Tag.PATH, "/data")
    device = p.text(Tag.DEVICE, "vol-raw")
    for payload in (
        path,  # no DEVICE
        device,  # no PATH
        p.records([device, path, p.record(Tag.READONLY, b"\x02")]),
        p.records([device, path, p.record(Tag.READONLY, b"\x01\x00")]),
        p.records([p.record(Tag.DEVICE, b"vol\x00raw"), path]),
    ):
        for kind in (Msg.MOUNT, Msg.UMOUNT):
            assert await raw_answer(channel, kind, payload) == (Msg.ERROR, errno.EINVAL)
    # READONLY is optional (read-write), and UMOUNT ignores it.
    assert await raw_answer(channel, Msg.MOUNT, p.records([device, path])) == (Msg.DONE, None)
    umount_payload = p.records([device, path, p.record(Tag.READONLY, b"\x01")])
    assert await raw_answer(channel, Msg.UMOUNT, umount_payload) == (Msg.DONE, None)


async def test_other_unknown_requests_still_get_enosys(channel: Channel) -> None:
    assert await raw_answer(channel, cast(Msg, 0x0F), b"") == (Msg.ERROR, errno.ENOSYS)


async def test_mounts_run_alongside_each_other(channel: Channel) -> None:
    async def one(index: int) -> None:
        await mount(channel, f"vol-many-{index}", f"/many/{index}", readonly=index % 2 == 0)
        await umount(channel, f"vol-many-{index}", f"/many/{index}")

    async with anyio.create_task_group() as tasks:
        for index in range(40):
            tasks.start_soon(one, index)
