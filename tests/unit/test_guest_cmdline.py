"""The kernel command line and the TSC helper."""

from __future__ import annotations

from pathlib import Path

import pytest

from managers.guest import TscUnavailableError, kernel_cmdline
from managers.guest.cmdline import host_tsc_khz, qemu_extra


def test_cmdline_names_console_and_never_hangs_on_panic() -> None:
    line = kernel_cmdline(extra=["tsc_early_khz=2600000"]).split()
    assert line[0] == "console=ttyS0"
    assert "panic=-1" in line
    assert line[-1] == "tsc_early_khz=2600000"
    assert kernel_cmdline(console="hvc0").split()[0] == "console=hvc0"


@pytest.mark.parametrize("item", ["", "a b", "x\ny"])
def test_cmdline_rejects_items_that_would_split(item: str) -> None:
    with pytest.raises(ValueError, match="whitespace"):
        kernel_cmdline(extra=[item])


def test_tsc_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu MHz\t\t: 2599.998\nflags\t: tsc\n")
    assert host_tsc_khz(cpuinfo=cpuinfo, tsc_freq=tmp_path / "absent") == 2599998


def test_tsc_prefers_the_kernels_own_value(tmp_path: Path) -> None:
    (tmp_path / "tsc_freq_khz").write_text("2400000\n")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("cpu MHz\t\t: 1000.0\n")
    assert host_tsc_khz(cpuinfo=cpuinfo, tsc_freq=tmp_path / "tsc_freq_khz") == 2400000


def test_tsc_unavailable_is_a_typed_error(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\n")
    absent = tmp_path / "absent"
    with pytest.raises(TscUnavailableError, match="cpu MHz"):
        host_tsc_khz(cpuinfo=cpuinfo, tsc_freq=absent)
    with pytest.raises(TscUnavailableError, match="cannot read"):
        host_tsc_khz(cpuinfo=tmp_path / "missing", tsc_freq=absent)


def test_tsc_of_this_host_is_plausible() -> None:
    assert 100_000 < host_tsc_khz() < 10_000_000


def test_qemu_machine_extras() -> None:
    assert qemu_extra("pc") == ()
    (tsc,) = qemu_extra("microvm")
    assert tsc.startswith("tsc_early_khz=")
    with pytest.raises(ValueError, match="unknown QEMU machine"):
        qemu_extra("q35")
