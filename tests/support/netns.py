"""Run test code inside a network namespace the test creates, and always remove it afterwards.

Approach: one named namespace per test (``ip netns add``) and one *worker process* living in
it. The worker is started with the ``spawn`` method, so it begins with a single thread, and
the first thing it does is ``setns(CLONE_NEWNET)`` into the namespace. Everything it then
creates (netlink sockets, TAP devices, nft tables, threads of ``anyio.to_thread``, child
processes) belongs to the namespace; nothing can reach the machine's own interfaces.

Why not ``setns()`` the pytest process or one of its threads: the namespace is per thread,
and a thread pool created earlier would keep running in the host namespace, so a stray
``to_thread`` call could touch the real network. A whole process entered before it does
anything has no such hole.

Tests send the worker a picklable callable (a module-level function; ``async def`` ones are
run with ``anyio.run``) with :meth:`NetnsWorker.call`, and get back its return value or its
exception, carrying the worker's traceback as a note. Bodies return plain data and the test
asserts on it in the pytest process, where assertion rewriting gives useful messages.

Teardown order matters and is enforced by :func:`netns_worker`: the worker is stopped (by PID,
killed if it does not exit), then the namespace is deleted, which takes every device in it
along. Both happen in ``finally`` blocks, so a failing test leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import inspect
import multiprocessing
import os
import secrets
import shutil
import signal
import subprocess
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from multiprocessing.connection import Connection
from typing import Any

import anyio

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
#: Name prefix of every namespace these helpers create; nothing else is ever deleted.
NETNS_PREFIX = "dpt-"


def unavailable_reason() -> str | None:
    """Why namespace tests cannot run here, or ``None`` when they can."""
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns add, TAP devices)"
    for tool in ("ip", "nft"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            return f"the {tool!r} command is not installed"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing, so no TAP devices can be made"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def link_namespaces(
    first: str, second: str, link: str, first_address: str, second_address: str
) -> None:
    """A veth pair: ``link`` in namespace ``first`` with ``first_address`` (a CIDR), ``eth0``
    in ``second`` with ``second_address``; both up. It goes with either namespace."""
    _ip("link", "add", link, "netns", first, "type", "veth", "peer", "name", "eth0",
        "netns", second)  # fmt: skip
    _ip("-n", first, "addr", "add", first_address, "dev", link)
    _ip("-n", first, "link", "set", link, "up")
    _ip("-n", second, "addr", "add", second_address, "dev", "eth0")
    _ip("-n", second, "link", "set", "eth0", "up")


@contextmanager
def network_namespace() -> Iterator[str]:
    """A fresh named namespace with ``lo`` up; deleted on exit whatever happened."""
    name = NETNS_PREFIX + secrets.token_hex(4)
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=30)


def enter_namespace(name: str) -> None:
    """Move the calling thread into the named namespace (``setns``; Python 3.11 has no
    ``os.setns``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _serve(namespace: str, conn: Connection) -> None:
    """The worker's main loop: enter the namespace, then run calls until told to stop."""
    try:
        enter_namespace(namespace)
    except BaseException as exc:
        conn.send(("err", exc, traceback.format_exc()))
        return
    conn.send(("ok", os.getpid(), ""))
    while True:
        request = conn.recv()
        if request is None:
            return
        func, args = request
        try:
            if inspect.iscoroutinefunction(func):
                result = anyio.run(func, *args, backend="asyncio")
            else:
                result = func(*args)
            conn.send(("ok", result, ""))
        except BaseException as exc:
            text = traceback.format_exc()
            try:
                conn.send(("err", exc, text))
            except Exception:
                conn.send(("err", RuntimeError(repr(exc)), text))


class NetnsWorker:
    """A process living in ``namespace`` that runs the callables it is sent."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(namespace, child_conn), name=f"netns-{namespace}", daemon=True
        )
        self._process.start()
        child_conn.close()
        self.pid: int = self._process.pid or 0
        try:
            self._receive(timeout=60)
        except BaseException:
            self.stop()
            raise

    def call(self, func: Callable[..., Any], *args: Any, timeout: float = 120) -> Any:
        """Run ``func(*args)`` in the namespace and return its result or raise its error."""
        self._conn.send((func, args))
        return self._receive(timeout)

    def _receive(self, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            self.stop()
            raise TimeoutError(f"netns worker {self.pid} gave no answer within {timeout} s")
        status, value, text = self._conn.recv()
        if status == "err":
            if isinstance(value, BaseException):
                value.add_note(f"in netns worker {self.pid} ({self.namespace}):\n{text}")
                raise value
            raise RuntimeError(text)
        return value

    def stop(self) -> None:
        """Ask the worker to exit; kill it by PID if it does not."""
        if self._process.is_alive():
            with suppress(OSError):
                self._conn.send(None)
            self._process.join(10)
        if self._process.is_alive():
            os.kill(self.pid, signal.SIGKILL)
            self._process.join(10)
        self._conn.close()


@contextmanager
def netns_worker() -> Iterator[NetnsWorker]:
    """A fresh namespace and a worker inside it; both gone on exit, the worker first."""
    with network_namespace() as name:
        worker = NetnsWorker(name)
        try:
            yield worker
        finally:
            worker.stop()
