"""The KVM probe against fake QEMUs: its answer, its deadline, its end with its caller, its cache.

No real KVM is needed: each fake is a shell script standing in for ``qemu-system-x86_64``,
and ``kvm_device`` points at a plain file the test can open, so the probe gets past its
``/dev/kvm`` check. Every fake writes its pid to a file; the probe execs the fake in place,
so that pid is the probe process itself.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from managers.hypervisors import Acceleration, accel
from managers.hypervisors.process import proc_start_time

REPO_ROOT = Path(__file__).resolve().parents[2]


class Fake:
    """A fake QEMU script, and what it leaves for the test: its pid and its arguments."""

    def __init__(self, directory: Path, name: str, body: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.pid_file = directory / f"{name}.pid"
        self.args_file = directory / f"{name}.args"
        self.path = directory / name
        self.path.write_text(
            "#!/bin/sh\n"
            f"echo $$ > '{self.pid_file}'\n"
            f"printf '%s\\n' \"$@\" > '{self.args_file}'\n" + body
        )
        self.path.chmod(0o755)

    def pid(self, within: float = 10.0) -> int:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            text = self.pid_file.read_text().strip() if self.pid_file.exists() else ""
            if text.isdigit():
                return int(text)
            time.sleep(0.01)
        raise AssertionError(f"{self.path.name} never started")

    def args(self) -> list[str]:
        return self.args_file.read_text().splitlines()


PANICS = "printf 'early noise\\n[    0.51] Kernel panic - not syncing: VFS: no root\\n'\n"
# Prints the banner, then hangs as a guest would after it: the probe must not wait for the end.
BANNER_THEN_HANGS = "printf 'Linux version 6.1.0\\n'\nexec sleep 600\n"
# The marker arrives in two writes, so in two reads of the pipe.
SPLIT_PANIC = "printf 'Kernel pa'\nsleep 0.3\nprintf 'nic - not syncing\\n'\nexec sleep 600\n"
SILENT_EXIT = "exit 1\n"
HANGS = "exec sleep 600\n"
# Ignores SIGTERM (inherited across exec), so only the probe's SIGKILL ends it.
HANGS_IGNORING_TERM = "trap '' TERM\nexec sleep 600\n"


def gone(pid: int) -> bool:
    """Ended: no such process, or a zombie nobody has reaped yet."""
    return proc_start_time(pid) is None


def wait_gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.02)
    return gone(pid)


@pytest.fixture
def processes() -> Iterator[list[tuple[int, int]]]:
    """(pid, start time) of processes the test saw start: killed by pid if still alive."""
    seen: list[tuple[int, int]] = []
    yield seen
    for pid, start in seen:
        # The start time proves the pid was not recycled since.
        if proc_start_time(pid) == start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def track(processes: list[tuple[int, int]], pid: int) -> int:
    start = proc_start_time(pid)
    if start is not None:
        processes.append((pid, start))
    return pid


@pytest.fixture
def kvm_device(tmp_path: Path) -> Path:
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    device.chmod(0o600)
    return device


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "bzImage"
    path.write_bytes(b"not really a kernel")
    return path


@pytest.fixture
def make_fake(tmp_path: Path) -> Callable[[str, str], Fake]:
    return functools.partial(Fake, tmp_path / "fakes")


@pytest.fixture(autouse=True)
def fresh_module_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "_cache", {})
    monkeypatch.setattr(accel, "_probing", {})


# --- the answer ---------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("body", [PANICS, BANNER_THEN_HANGS, SPLIT_PANIC])
async def test_a_console_marker_means_kvm_runs_guests(
    body: str,
    make_fake: Callable[[str, str], Fake],
    kernel: Path,
    kvm_device: Path,
    processes: list[tuple[int, int]],
) -> None:
    fake = make_fake("qemu", body)
    runs = await accel._kvm_runs_guest(str(fake.path), kernel, seconds=30, kvm_device=kvm_device)
    pid = track(processes, fake.pid())
    assert runs is True
    # A guest that keeps running after its marker is ended, not waited for.
    assert gone(pid)
    args = fake.args()
    assert args[args.index("-serial") + 1] == "stdio"
    assert args[args.index("-machine") + 1] == "pc,accel=kvm"
    assert str(kernel) in args


@pytest.mark.anyio
async def test_no_marker_before_qemu_ends_means_no_kvm(
    make_fake: Callable[[str, str], Fake], kernel: Path, kvm_device: Path
) -> None:
    fake = make_fake("qemu", SILENT_EXIT)
    assert not await accel._kvm_runs_guest(
        str(fake.path), kernel, seconds=30, kvm_device=kvm_device
    )


@pytest.mark.anyio
async def test_without_kvm_device_access_qemu_is_not_even_started(
    make_fake: Callable[[str, str], Fake], kernel: Path, tmp_path: Path
) -> None:
    fake = make_fake("qemu", PANICS)
    missing = tmp_path / "no-kvm"
    assert not await accel._kvm_runs_guest(str(fake.path), kernel, kvm_device=missing)
    assert not fake.pid_file.exists()


@pytest.mark.anyio
async def test_a_missing_qemu_binary_is_an_error_not_an_answer(
    kernel: Path, kvm_device: Path, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError):
        await accel._kvm_runs_guest(str(tmp_path / "no-qemu"), kernel, kvm_device=kvm_device)


# --- its end ------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("body", [HANGS, HANGS_IGNORING_TERM])
async def test_a_hanging_probe_says_no_by_its_deadline_and_is_ended(
    body: str,
    make_fake: Callable[[str, str], Fake],
    kernel: Path,
    kvm_device: Path,
    processes: list[tuple[int, int]],
) -> None:
    fake = make_fake("qemu", body)
    started = time.monotonic()
    runs = await accel._kvm_runs_guest(str(fake.path), kernel, seconds=0.5, kvm_device=kvm_device)
    pid = track(processes, fake.pid())
    assert runs is False
    assert time.monotonic() - started < 10
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.anyio
async def test_a_cancelled_caller_ends_the_probe(
    make_fake: Callable[[str, str], Fake],
    kernel: Path,
    kvm_device: Path,
    processes: list[tuple[int, int]],
) -> None:
    fake = make_fake("qemu", HANGS)
    probe = functools.partial(
        accel._kvm_runs_guest, str(fake.path), kernel, seconds=600, kvm_device=kvm_device
    )
    async with anyio.create_task_group() as group:
        group.start_soon(probe)
        pid = track(processes, await anyio.to_thread.run_sync(fake.pid))
        assert not gone(pid)
        group.cancel_scope.cancel()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


_PROBE_IN_CHILD = """\
import sys
from pathlib import Path

import anyio

from managers.hypervisors.accel import _kvm_runs_guest

qemu, kernel, device = sys.argv[1:]
anyio.run(lambda: _kvm_runs_guest(qemu, Path(kernel), seconds=600, kvm_device=Path(device)))
"""


def test_the_probe_dies_with_a_killed_caller(
    make_fake: Callable[[str, str], Fake],
    kernel: Path,
    kvm_device: Path,
    processes: list[tuple[int, int]],
) -> None:
    fake = make_fake("qemu", HANGS)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    caller = subprocess.Popen(
        [sys.executable, "-c", _PROBE_IN_CHILD, str(fake.path), str(kernel), str(kvm_device)],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    track(processes, caller.pid)
    try:
        pid = track(processes, fake.pid())
        assert not gone(pid)
        # SIGKILL: the caller gets no chance to end the probe itself.
        caller.kill()
        caller.wait(timeout=10)
        assert wait_gone(pid, within=10.0), "the probe outlived its killed caller"
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait(timeout=10)


# --- the cache ----------------------------------------------------------------------------


class FakeProbe:
    """Stands in for the real probe: KVM for kernels named ``kvm-*``, and counts its runs."""

    def __init__(self) -> None:
        self.runs: list[str] = []

    async def __call__(self, qemu_bin: str, kernel: Path) -> bool:
        self.runs.append(kernel.name)
        await anyio.sleep(0.05)
        return kernel.name.startswith("kvm-")


@pytest.fixture
def fake_probe(monkeypatch: pytest.MonkeyPatch) -> FakeProbe:
    probe = FakeProbe()
    monkeypatch.setattr(accel, "_kvm_runs_guest", probe)
    return probe


@pytest.fixture
def kernels(tmp_path: Path) -> dict[str, Path]:
    found = {}
    for name in ("kvm-6.1", "tcg-6.12"):
        found[name] = tmp_path / "kernels" / name
        found[name].parent.mkdir(exist_ok=True)
        found[name].write_bytes(name.encode())
    return found


QEMU = "/bin/true"  # any existing binary: the fingerprint stats it, the fake probe ignores it


def forget_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """As a new dataplane process would start: only the file remembers."""
    monkeypatch.setattr(accel, "_cache", {})


@pytest.mark.anyio
async def test_answers_for_different_kernels_all_stay_in_the_file(
    fake_probe: FakeProbe,
    kernels: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = tmp_path / "run" / "acceleration.json"
    assert await accel.probe_acceleration(QEMU, kernels["kvm-6.1"], cache) is Acceleration.KVM
    assert await accel.probe_acceleration(QEMU, kernels["tcg-6.12"], cache) is Acceleration.TCG
    assert len(json.loads(cache.read_text())) == 2

    forget_in_memory(monkeypatch)
    assert await accel.probe_acceleration(QEMU, kernels["tcg-6.12"], cache) is Acceleration.TCG
    assert await accel.probe_acceleration(QEMU, kernels["kvm-6.1"], cache) is Acceleration.KVM
    assert fake_probe.runs == ["kvm-6.1", "tcg-6.12"]


@pytest.mark.anyio
async def test_concurrent_callers_share_one_probe(
    fake_probe: FakeProbe, kernels: dict[str, Path], tmp_path: Path
) -> None:
    cache = tmp_path / "acceleration.json"
    answers: list[Acceleration] = []

    async def ask() -> None:
        answers.append(await accel.probe_acceleration(QEMU, kernels["kvm-6.1"], cache))

    async with anyio.create_task_group() as group:
        for _ in range(3):
            group.start_soon(ask)
    assert answers == [Acceleration.KVM] * 3
    assert fake_probe.runs == ["kvm-6.1"]


@pytest.mark.anyio
async def test_entries_of_another_boot_are_neither_trusted_nor_kept(
    fake_probe: FakeProbe, kernels: dict[str, Path], tmp_path: Path
) -> None:
    cache = tmp_path / "acceleration.json"
    key = accel._fingerprint(QEMU, kernels["tcg-6.12"])
    cache.write_text(
        json.dumps(
            {
                # Same binary and kernel, answered during an earlier boot.
                key: {"acceleration": "kvm", "boot_id": "an-earlier-boot", "probed_at": 2.0},
                "/usr/bin/qemu|/boot/x": {
                    "acceleration": "kvm",
                    "boot_id": "an-earlier-boot",
                    "probed_at": 1.0,
                },
            }
        )
    )
    assert await accel.probe_acceleration(QEMU, kernels["tcg-6.12"], cache) is Acceleration.TCG
    assert fake_probe.runs == ["tcg-6.12"]
    stored = json.loads(cache.read_text())
    assert list(stored) == [key]
    assert stored[key]["acceleration"] == "tcg"
    assert stored[key]["boot_id"] == accel._boot_id()


@pytest.mark.anyio
@pytest.mark.parametrize("content", ['{"k|k|boot": "kvm"}', "[]", "{not json", ""])
async def test_an_old_or_damaged_file_only_costs_a_probe(
    content: str, fake_probe: FakeProbe, kernels: dict[str, Path], tmp_path: Path
) -> None:
    cache = tmp_path / "acceleration.json"
    cache.write_text(content)
    assert await accel.probe_acceleration(QEMU, kernels["kvm-6.1"], cache) is Acceleration.KVM
    assert fake_probe.runs == ["kvm-6.1"]
    assert len(json.loads(cache.read_text())) == 1


@pytest.mark.anyio
async def test_the_file_keeps_the_newest_answers_up_to_its_limit(
    fake_probe: FakeProbe, kernels: dict[str, Path], tmp_path: Path
) -> None:
    cache = tmp_path / "acceleration.json"
    boot = accel._boot_id()
    cache.write_text(
        json.dumps(
            {
                f"/q|/k{n}": {"acceleration": "tcg", "boot_id": boot, "probed_at": float(n)}
                for n in range(1, accel.CACHE_LIMIT + 1)
            }
        )
    )
    await accel.probe_acceleration(QEMU, kernels["kvm-6.1"], cache)
    stored = json.loads(cache.read_text())
    assert len(stored) == accel.CACHE_LIMIT
    assert "/q|/k1" not in stored
    assert f"/q|/k{accel.CACHE_LIMIT}" in stored
    assert accel._fingerprint(QEMU, kernels["kvm-6.1"]) in stored


# --- nothing left behind ------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_probe_leaves_no_files_behind(
    make_fake: Callable[[str, str], Fake],
    kernel: Path,
    kvm_device: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    processes: list[tuple[int, int]],
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    real_probe = accel._kvm_runs_guest
    monkeypatch.setattr(
        accel,
        "_kvm_runs_guest",
        functools.partial(real_probe, seconds=0.5, kvm_device=kvm_device),
    )
    run_dir = tmp_path / "run"
    cache = run_dir / "acceleration.json"
    ok, hangs = make_fake("qemu-ok", PANICS), make_fake("qemu-hangs", HANGS)
    assert await accel.probe_acceleration(str(ok.path), kernel, cache) is Acceleration.KVM
    assert await accel.probe_acceleration(str(hangs.path), kernel, cache) is Acceleration.TCG
    for fake in (ok, hangs):
        assert gone(track(processes, fake.pid()))
    assert list(scratch.iterdir()) == []
    assert [path.name for path in run_dir.iterdir()] == ["acceleration.json"]
