"""Starting, watching and ending VMM processes.

VMMs run in their own session (and so their own process group) so a dataplane restart or a
Ctrl-C on the dataplane's terminal does not reach them. A pid alone is not an identity: it is
paired with the process's start time from ``/proc/<pid>/stat`` so a recycled pid is never
mistaken for our VMM. Once that identity is checked the process is held by a pidfd, which turns
readable the moment it ends: asking whether a VMM is alive is then one ``poll`` (no ``/proc``
read), and waiting for its end is an await on the event loop (no polling), for an adopted VMM
as much as for a child.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process

from managers.failpoints import failpoint

from .errors import VmmDied, VmmNotFound, VmmStartTimeout
from .layout import VmmFiles


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks, or None when it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = raw.rpartition(")")[2].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


class VmmProcess:
    """One VMM process, either started by us (``child`` is set) or adopted by pid."""

    def __init__(self, pid: int, start_time: int, child: Process | None = None) -> None:
        self.pid = pid
        self.start_time = start_time
        self._child = child
        self._pidfd: int | None = None
        self._poller: select.poll | None = None
        self._gone = False

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        files: VmmFiles,
        instance_id: str,
        record: Mapping[str, Any],
    ) -> VmmProcess:
        """Start a VMM and record it (``record`` plus pid and start time) at once.

        The record is written before anything waits for the VMM's socket, so a dataplane
        killed at any later instant leaves a process that start-up can find, identify and
        end; the instant between the fork and that write is covered by :func:`vmm_pids`.
        """
        log = await anyio.to_thread.run_sync(_prepare, files)
        try:
            try:
                child = await anyio.open_process(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=str(files.workdir),
                    # What the VMM writes (serial console, snapshots, its socket) holds guest
                    # data: root's alone, whatever umask the dataplane was started with.
                    umask=0o077,
                )
            except OSError as exc:
                raise VmmDied(instance_id, f"could not start {argv[0]!r}: {exc}") from exc
        finally:
            os.close(log)
        start = proc_start_time(child.pid)
        process = cls(child.pid, start if start is not None else 0, child)
        failpoint("vmm.forked")
        try:
            await anyio.to_thread.run_sync(
                files.write_record,
                {**record, "pid": process.pid, "start_time": process.start_time},
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await process.terminate()
            raise
        failpoint("vmm.spawned")
        return process

    def alive(self) -> bool:
        if self._gone:
            return False
        if self._child is not None and self._child.returncode is not None:
            return self._ended()
        if self._poller is None:
            return self._hold()
        return not self._poller.poll(0) or self._ended()

    def _hold(self) -> bool:
        """First look: check the identity, then pin the process with a pidfd."""
        if proc_start_time(self.pid) != self.start_time:
            return self._ended()
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return self._ended()
        except OSError:
            # No pidfd (an old kernel, a seccomp filter, no descriptor left): the identity
            # just checked answers, and the next look checks it again.
            return True
        # The pid may have been recycled between the check and the open; the fd now pins
        # whichever process it is, so checking again settles it.
        if proc_start_time(self.pid) != self.start_time:
            os.close(fd)
            return self._ended()
        self._pidfd = fd
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        return True

    def _ended(self) -> bool:
        self._gone = True
        self.release()
        return False

    def release(self) -> None:
        """Let go of the pidfd (the process itself is untouched)."""
        self._poller = None
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            # A task waiting on the fd is woken (ClosedResourceError) rather than left
            # waiting on a number the next open may reuse.
            with contextlib.suppress(Exception):
                anyio.notify_closing(fd)
            os.close(fd)

    @property
    def exit_code(self) -> int | None:
        return self._child.returncode if self._child is not None else None

    async def wait_exit(self, seconds: float) -> bool:
        """Wait for the process to end; True when it did within ``seconds``."""
        with anyio.move_on_after(seconds):
            if self._child is not None:
                await self._child.wait()
                self._ended()
                return True
            while self.alive():
                fd = self._pidfd
                if fd is None:
                    await anyio.sleep(0.01)  # no pidfd on this host: look again soon
                    continue
                try:
                    await anyio.wait_readable(fd)
                except (anyio.BusyResourceError, anyio.ClosedResourceError):
                    # Another task waits on the same fd, or let go of it: look again soon.
                    await anyio.sleep(0.01)
            return True
        return not self.alive()

    def signal_group(self, sig: signal.Signals) -> None:
        if not self.alive():
            return
        try:
            # The VMM leads its own session, so its group holds it and anything it forked.
            if os.getpgid(self.pid) == self.pid:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    async def terminate(self, grace: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns once the process is gone."""
        self.signal_group(signal.SIGTERM)
        if await self.wait_exit(grace):
            return
        self.signal_group(signal.SIGKILL)
        await self.wait_exit(5.0)

    async def aclose(self) -> None:
        self.release()
        if self._child is not None:
            await self._child.aclose()


def _prepare(files: VmmFiles) -> int:
    """Clear the way for a new VMM and open its log (our fd, which the VMM inherits)."""
    files.prepare()
    return os.open(files.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def recorded_process(
    files: VmmFiles, kind: str, label: str, instance_id: str
) -> tuple[VmmProcess, dict[str, Any]]:
    """The live VMM that ``files`` record for backend ``kind``, with its record, for
    re-adopting it. Raises ``VmmNotFound`` when there is none; a dead one's socket and
    record are removed on the way."""
    record = files.read_record()
    if record is None or record.get("kind") != kind:
        raise VmmNotFound(instance_id, f"no {label} record in {str(files.workdir)!r}")
    process = VmmProcess(int(record["pid"]), int(record["start_time"]))
    if not process.alive():
        files.remove_runtime()
        raise VmmNotFound(instance_id, f"{label} (pid {process.pid}) is no longer running")
    return process, record


async def binary_version(binary: str) -> str:
    """First line of ``binary --version``; raises OSError or CalledProcessError when it fails."""
    result = await anyio.run_process([binary, "--version"], stdin=subprocess.DEVNULL)
    lines = result.stdout.decode(errors="replace").strip().splitlines()
    return lines[0] if lines else ""


def _socket_answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(str(path))
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
            return False
        return False
    finally:
        probe.close()


async def wait_for_socket(
    process: VmmProcess, files: VmmFiles, instance_id: str, seconds: float
) -> None:
    """Return once the VMM accepts connections on its socket.

    Polls with a short, growing interval and watches the process at each step, so a VMM that
    dies fails at once and one that hangs fails after ``seconds``.
    """
    delay = 0.005
    with anyio.move_on_after(seconds):
        while True:
            if not process.alive():
                raise VmmDied(
                    instance_id,
                    f"VMM exited with code {process.exit_code} before its socket came up"
                    + _log_suffix(files),
                    process.exit_code,
                )
            if files.socket.exists() and await anyio.to_thread.run_sync(
                _socket_answers, files.socket
            ):
                # Whoever can connect can drive the VM: root alone, like the guest's files.
                with contextlib.suppress(OSError):
                    os.chmod(files.socket, 0o600)
                return
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.1)
    raise VmmStartTimeout(
        instance_id,
        f"VMM socket {str(files.socket)!r} did not come up within {seconds:g} s"
        + _log_suffix(files),
    )


def _log_suffix(files: VmmFiles) -> str:
    tail = files.log_tail()
    return f" (VMM log: {tail})" if tail else ""


def vmm_pids(workdir: Path) -> list[int]:
    """Every process that is a VMM of ``workdir``, recorded or not.

    A VMM is started with ``workdir`` as its current directory and its API socket on its
    command line in the form only a VMM is given it (``path=<socket>`` for Cloud Hypervisor,
    ``unix:<socket>,`` for QEMU's QMP); both together mark it as ours, where a client such as
    ``ch-remote`` or ``socat`` run from that folder names the socket otherwise. The directory
    is compared by device and inode, so a symlink on the way to ``DATA_DIR`` does not hide a
    VMM. This finds a VMM whose record was never written (the dataplane died between the fork
    and the write) or was lost with a damaged folder. It reads ``/proc``: call it in a worker
    thread.
    """
    try:
        folder = os.stat(workdir)
    except OSError:
        return []
    socket_path = str(VmmFiles(workdir).socket).encode()
    marks = (b"path=" + socket_path, b"unix:" + socket_path + b",")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.stat(entry / "cwd")
            if (cwd.st_dev, cwd.st_ino) != (folder.st_dev, folder.st_ino):
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.startswith(mark) for arg in argv for mark in marks):
            found.append(int(entry.name))
    return found


def _vmm_identities(workdir: Path) -> list[tuple[int, int]]:
    """The VMMs of ``workdir`` with their start times, each read before its marks are checked
    and again after: a pid recycled in between is not taken for ours."""
    before = {pid: proc_start_time(pid) for pid in vmm_pids(workdir)}
    if not before:
        return []
    still = set(vmm_pids(workdir))
    return [
        (pid, start)
        for pid, start in before.items()
        if start is not None and pid in still and proc_start_time(pid) == start
    ]


async def terminate_recorded(workdir: Path) -> bool:
    """End every VMM of ``workdir`` even when its API no longer answers.

    For a VMM that cannot be attached to (it hangs, or speaks a version we refuse), or one
    a crash left unrecorded: the record's pid and start time identify the recorded one, so
    a recycled pid is never signalled, and :func:`vmm_pids` finds the rest. Returns True
    when a live process was ended.
    """
    files = VmmFiles(workdir)
    record = await anyio.to_thread.run_sync(files.read_record)
    processes: list[VmmProcess] = []
    if record is not None and "pid" in record and "start_time" in record:
        with contextlib.suppress(TypeError, ValueError):
            processes.append(VmmProcess(int(record["pid"]), int(record["start_time"])))
    recorded = {process.pid for process in processes}
    for pid, start in await anyio.to_thread.run_sync(_vmm_identities, workdir):
        if pid not in recorded:
            processes.append(VmmProcess(pid, start))
    ended = False
    for process in processes:
        try:
            if process.alive():
                await process.terminate()
                ended = True
        finally:
            process.release()
    await anyio.to_thread.run_sync(files.remove_runtime)
    return ended
