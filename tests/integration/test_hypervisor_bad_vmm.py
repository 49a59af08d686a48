"""A VMM that never comes up, dies, or answers garbage: a typed error naming the instance, and
no process, socket or record left behind."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from managers.hypervisors import (
    Acceleration,
    BackendKind,
    BackendSettings,
    HypervisorError,
    UnsupportedVersion,
    VmmDied,
    VmmProtocolError,
    VmmStartTimeout,
    VmSpec,
    open_backend,
)
from managers.hypervisors.process import proc_start_time

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]
ID = "inst-bad"


def fake_vmm(tmp_path: Path, mode: str) -> tuple[Path, Path]:
    pidfile = tmp_path / "fake.pid"
    script = tmp_path / f"fake-{mode}"
    script.write_text(
        "#!/bin/sh\n"
        f"PYTHONPATH={ROOT} exec {sys.executable} -m tests.support.hypervisor_bad_vmm "
        f'{mode} {pidfile} -- "$@"\n'
    )
    script.chmod(0o755)
    return script, pidfile


async def start_and_boot(kind: BackendKind, binary: Path, workdir: Path) -> None:
    settings = BackendSettings(
        cloud_hypervisor_bin=str(binary),
        qemu_bin=str(binary),
        start_timeout=1.5,
        acceleration=Acceleration.TCG,
    )
    backend = open_backend(kind, settings)
    vmm = await backend.start_vmm(ID, workdir)
    kernel = workdir.parent / "kernel"
    kernel.write_bytes(b"not booted by a fake VMM")
    await vmm.create_and_boot(VmSpec(kernel=kernel, serial_file=workdir / "serial.log"))


CASES = [
    ("hang", VmmStartTimeout, "did not come up"),
    ("die", VmmDied, "Permission denied"),
    ("garbage", VmmProtocolError, ""),
]


@pytest.mark.parametrize("kind", [BackendKind.CLOUD_HYPERVISOR, BackendKind.QEMU])
@pytest.mark.parametrize(("mode", "error", "detail"), CASES)
async def test_bad_vmm_gives_typed_error_and_leaves_nothing(
    tmp_path: Path, kind: BackendKind, mode: str, error: type[HypervisorError], detail: str
) -> None:
    binary, pidfile = fake_vmm(tmp_path, mode)
    workdir = tmp_path / "vm"
    with pytest.raises(error, match=ID) as caught:
        await start_and_boot(kind, binary, workdir)
    assert detail in str(caught.value)
    assert caught.value.instance_id == ID
    pid = int(pidfile.read_text())
    assert proc_start_time(pid) is None, f"fake VMM {pid} was left running"
    assert not (workdir / "vmm.sock").exists()
    assert not (workdir / "vmm.json").exists()


async def test_unknown_cloud_hypervisor_major_is_refused(tmp_path: Path) -> None:
    binary, pidfile = fake_vmm(tmp_path, "old-version")
    workdir = tmp_path / "vm"
    with pytest.raises(UnsupportedVersion, match=r"41\.0"):
        await start_and_boot(BackendKind.CLOUD_HYPERVISOR, binary, workdir)
    assert proc_start_time(int(pidfile.read_text())) is None
    assert not (workdir / "vmm.sock").exists()


async def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(VmmDied, match="could not start"):
        await start_and_boot(BackendKind.CLOUD_HYPERVISOR, tmp_path / "nope", tmp_path / "vm")
    assert not (tmp_path / "vm" / "vmm.json").exists()
