"""The guest kernel's command line: the one place that knows it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from .errors import TscUnavailableError

# quiet: kernel chatter on an emulated UART costs boot time and buries the markers.
# panic=-1: a guest whose init dies reboots at once, which a VMM run with -no-reboot (or
# Cloud Hypervisor) turns into an exit instead of a hang.
_BASE = ("quiet", "panic=-1", "rdinit=/init")


def kernel_cmdline(*, console: str = "ttyS0", extra: Sequence[str] = ()) -> str:
    """The command line for our kernel + initrd; ``extra`` is appended verbatim."""
    for item in extra:
        if not item or any(ch.isspace() for ch in item):
            raise ValueError(f"kernel command-line item {item!r} is empty or contains whitespace")
    return " ".join((f"console={console}", *_BASE, *extra))


def host_tsc_khz(
    *,
    cpuinfo: Path = Path("/proc/cpuinfo"),
    tsc_freq: Path = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz"),
) -> int:
    """The host's TSC frequency in kHz.

    QEMU's ``microvm`` machine under TCG hangs about one boot in six while the guest calibrates
    its TSC; telling the guest the frequency (``tsc_early_khz``) skips that calibration. Under
    TCG the guest's TSC ticks at the host's rate, which ``cpu MHz`` reports on a host with a
    constant TSC. Kernels that export ``tsc_freq_khz`` are asked first.
    """
    try:
        return int(tsc_freq.read_text().strip())
    except (OSError, ValueError):
        pass
    try:
        text = cpuinfo.read_text()
    except OSError as exc:
        raise TscUnavailableError(f"cannot read {cpuinfo}: {exc.strerror}") from exc
    match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.MULTILINE)
    if match is None:
        raise TscUnavailableError(f"no 'cpu MHz' line in {cpuinfo}: cannot tell the TSC rate")
    return round(float(match.group(1)) * 1000)


def tsc_early_khz_arg() -> str:
    """``tsc_early_khz=<host kHz>``: pass it in ``extra`` when booting QEMU ``microvm``."""
    return f"tsc_early_khz={host_tsc_khz()}"


def qemu_extra(machine: str) -> tuple[str, ...]:
    """The ``extra`` items a QEMU machine type needs (measured under TCG).

    ``microvm``: ``tsc_early_khz`` (else ~1 boot in 6 hangs). ``pc``: nothing. ``pci=noacpi``
    (or ``acpi=noirq``) would save ~0.3-0.5 s of AML interpretation per boot under TCG, but
    without ACPI the guest registers no hot-plug slots, and a device hot-plugged anyway gets no
    interrupt ("can't find IRQ for PCI INT A": SeaBIOS's PIRQ table lists only the devices
    present at boot), so volumes could not be attached to a running guest.
    """
    if machine == "microvm":
        return (tsc_early_khz_arg(),)
    if machine == "pc":
        return ()
    raise ValueError(f"unknown QEMU machine {machine!r}: expected 'microvm' or 'pc'")
