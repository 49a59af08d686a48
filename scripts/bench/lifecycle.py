"""Instance lifecycle: the API against the same work done by hand, measured in one run.

One registry, one image (the counter program of the end-to-end tests), one dataplane server on
127.0.0.1 (default hypervisor QEMU, Cloud Hypervisor simulator available by override), then:

1. QEMU/TCG create -> ``Running``: ``POST /instances`` and a ``GET`` every ~10 ms until the
   state is ``Running``, against the same guest launched by hand (same kernel, initrd, command
   line; the image disk the dataplane built, a fresh overlay from ``create_overlay_disk``, a
   config disk from ``write_config_disk`` with the same entrypoint, the same output channel),
   timed from making its disks to the program-started marker in its serial file. Interleaved;
   medians; target ratio <= 1.15.
2. QEMU/TCG standby and restore: ``POST .../standby`` and ``POST .../restore`` (until it answers
   ``Running``) against raw QMP on a hand-launched QEMU of the same guest: ``stop`` + ``migrate``
   to ``exec:cat > FILE`` until completed + ``quit`` (until the process is gone), and a new QEMU
   with ``-incoming "exec:cat FILE"`` + ``cont`` until ``query-status`` says running. Targets:
   standby ratio <= 1.2, restore <= raw + 50 ms.
3. The Cloud Hypervisor simulator: request latency p50/p99 of create, get, list, pause, resume,
   standby, restore; target p50 <= 5 ms for get, list, pause and resume.

Prints a table per section and the verdicts; exits 1 when a target is missed. Every process it
starts is stopped by PID, and every instance deleted, even on failure.

    .venv/bin/python scripts/bench/lifecycle.py [--runs 5] [--cycles 5] [--cheap 50] [--heavy 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from managers.guest import (
    GuestArtifacts,
    GuestConfig,
    create_overlay_disk,
    kernel_cmdline,
    qemu_extra,
    write_config_disk,
)
from managers.guest.markers import PREFIX
from managers.hypervisors import BackendKind, output_transport
from managers.hypervisors.qemu_argv import OUTPUT_PORT_NAME
from managers.paths import Paths
from tests.support.apps import COUNTER, push_app
from tests.support.artifacts import shared_artifacts
from tests.support.registry import running_registry
from tests.support.server import RunningServer, run_server

SIMULATOR = Path(__file__).resolve().parents[2] / "tests/support/ch_simulator/cloud-hypervisor"
STARTED = f"\n{PREFIX}program-started\n".encode()
EXITED = f"\n{PREFIX}program-exited code=0\n".encode()
POLL = 0.01  # seconds between polls, on both sides
BOUND = 120.0  # no single wait may take longer

CREATE_RATIO = 1.15
STANDBY_RATIO = 1.2
RESTORE_EXTRA_MS = 50.0
CHEAP_P50_MS = 5.0
IDLE_SECONDS = 5.0


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.1f}"


# -- a minimal QMP client ----------------------------------------------------------------------
class Qmp:
    """Blocking QMP over a Unix socket: one JSON object per line, events skipped."""

    def __init__(self, path: Path) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(BOUND)
        self._sock.connect(str(path))
        self._buffer = b""
        greeting = self._read()
        if "QMP" not in greeting:
            raise RuntimeError(f"not a QMP greeting: {greeting!r:.200}")
        self.execute("qmp_capabilities")

    @classmethod
    def connect(cls, path: Path, process: subprocess.Popen[bytes]) -> Qmp:
        deadline = time.monotonic() + BOUND
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"qemu exited with {process.returncode} before QMP came up")
            with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
                return cls(path)
            if time.monotonic() > deadline:
                raise RuntimeError("QMP socket never came up")
            time.sleep(0.002)

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise RuntimeError("QMP connection closed")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        value: dict[str, Any] = json.loads(line)
        return value

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self._sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"QEMU refused {command}: {reply['error']}")
            return reply.get("return")

    def status(self) -> str:
        return str(self.execute("query-status")["status"])

    def close(self) -> None:
        self._sock.close()


# -- the guest launched by hand ----------------------------------------------------------------
@dataclass
class Processes:
    """Every process this script starts; all are stopped by PID at the end."""

    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        self.started.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def stop_all(self) -> None:
        for process in self.started:
            self.stop(process)


@dataclass
class RawGuest:
    """One hand-made guest: its disks and how to launch QEMU on them."""

    artifacts: GuestArtifacts
    image_disk: Path
    config: GuestConfig
    memory_mb: int
    overlay_mb: int
    workdir: Path

    def make_disks(self, portal: BlockingPortal) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        portal.call(create_overlay_disk, self.overlay, self.overlay_mb << 20)
        portal.call(write_config_disk, self.config_disk, self.config)

    @property
    def overlay(self) -> Path:
        return self.workdir / "overlay.raw"

    @property
    def config_disk(self) -> Path:
        return self.workdir / "config.img"

    @property
    def qmp_socket(self) -> Path:
        return self.workdir / "qmp.sock"

    def argv(self, serial: Path, incoming: Path | None = None) -> list[str]:
        argv = [
            "qemu-system-x86_64",
            "-machine", "pc,accel=tcg", "-cpu", "max", "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-shutdown",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            "-serial", f"file:{serial}",
            "-kernel", str(self.artifacts.bzimage),
            "-initrd", str(self.artifacts.initrd),
            "-append", kernel_cmdline(extra=qemu_extra("pc")),
            "-m", f"{self.memory_mb}M",
        ]  # fmt: skip
        disks = (
            ("image", self.image_disk, True),
            ("overlay", self.overlay, False),
            ("config", self.config_disk, True),
        )
        for slot, (name, path, readonly) in enumerate(disks, start=3):
            ro = "on" if readonly else "off"
            argv += [
                "-blockdev", f"driver=file,node-name=f-{name},filename={path},read-only={ro}",
                "-blockdev", f"driver=raw,node-name={name},file=f-{name},read-only={ro}",
                "-device",
                f"virtio-blk-pci,id={name},drive={name},bus=pci.0,addr={hex(slot)},serial={name}",
            ]  # fmt: skip
        # The virtio-serial controller and the program's output port, as every instance has
        # them (the agent's port beside it is left out: nothing talks to it here).
        argv += [
            "-device", f"virtio-serial-pci,id=vser,bus=pci.0,addr={hex(slot + 1)}",
            "-chardev", f"file,id=out,path={serial.with_suffix('.output')}",
            "-device", f"virtserialport,bus=vser.0,chardev=out,name={OUTPUT_PORT_NAME}",
        ]  # fmt: skip
        if incoming is not None:
            argv += ["-incoming", f"exec:cat {incoming}"]
        return argv


def wait_marker(serial: Path, process: subprocess.Popen[bytes], marker: bytes = STARTED) -> None:
    """Until ``marker`` (by default program-started) is in the guest's serial file."""
    deadline = time.monotonic() + BOUND
    seen = b""
    offset = 0
    while True:
        with contextlib.suppress(FileNotFoundError), serial.open("rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
            offset += len(chunk)
            seen = seen[-len(marker) :] + chunk
            if marker in seen:
                return
        if process.poll() is not None:
            raise RuntimeError(f"the hand-launched guest exited ({process.returncode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {marker!r} in {serial}")
        time.sleep(POLL)


# -- the API side --------------------------------------------------------------------------------
def call(client: httpx.Client, method: str, url: str, expect: int, **kwargs: Any) -> Any:
    response = client.request(method, url, **kwargs)
    if response.status_code != expect:
        raise RuntimeError(f"{method} {url} answered {response.status_code}: {response.text[:300]}")
    return response.json() if response.content else None


def wait_state(client: httpx.Client, instance_id: str, wanted: str) -> None:
    deadline = time.monotonic() + BOUND
    while True:
        state = call(client, "GET", f"/instances/{instance_id}", 200)["state"]
        if state == wanted:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"instance {instance_id} still {state}, wanted {wanted}")
        time.sleep(POLL)


def wait_image(client: httpx.Client, image: str) -> dict[str, Any]:
    deadline = time.monotonic() + BOUND
    while True:
        found: dict[str, Any] = call(client, "GET", f"/images/{quote(image, safe='')}", 200)
        if found["status"] == "ready":
            return found
        if found["status"] == "failed" or time.monotonic() > deadline:
            raise RuntimeError(f"image build did not finish: {found}")
        time.sleep(0.1)


def delete_all(client: httpx.Client, pids: set[int]) -> None:
    for instance in client.get("/instances").json():
        if instance.get("pid"):
            pids.add(int(instance["pid"]))
        client.delete(f"/instances/{instance['id']}")


# -- the sections ------------------------------------------------------------------------------
@dataclass
class Bench:
    client: httpx.Client
    portal: BlockingPortal
    processes: Processes
    raw: RawGuest
    image: str
    memory_mb: int
    overlay_mb: int
    data_dir: Path
    server_pid: int
    failed: bool = False
    post_seconds: list[float] = field(default_factory=list)

    def verdict(self, ok: bool) -> str:
        self.failed |= not ok
        return "ok" if ok else "MISSED"

    def create_body(self, name: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "image": self.image,
            "memory_mb": self.memory_mb,
            "overlay_size_mb": self.overlay_mb,
            **extra,
        }

    def api_create(self, name: str) -> tuple[str, float]:
        started = time.perf_counter()
        instance = call(self.client, "POST", "/instances", 201, json=self.create_body(name))
        self.post_seconds.append(time.perf_counter() - started)
        wait_state(self.client, instance["id"], "Running")
        return instance["id"], time.perf_counter() - started

    def raw_boot(self, name: str) -> tuple[subprocess.Popen[bytes], float]:
        self.raw.workdir = self.raw.workdir.parent / name
        started = time.perf_counter()
        self.raw.make_disks(self.portal)
        serial = self.raw.workdir / "serial-0.log"
        process = self.processes.spawn(self.raw.argv(serial), self.raw.workdir / "qemu.log")
        wait_marker(serial, process)
        return process, time.perf_counter() - started

    def create_section(self, runs: int) -> None:
        api: list[float] = []
        raw: list[float] = []
        # Warm-up, not counted: the server's first QEMU create pays a one-time acceleration
        # probe (a KVM boot attempt bounded by PROBE_TIMEOUT where /dev/kvm exists), and both
        # sides warm the page cache for the kernel, initrd and image disk.
        instance_id, first_api = self.api_create("warm-up")
        call(self.client, "DELETE", f"/instances/{instance_id}", 204)
        process, first_raw = self.raw_boot("warm-up")
        self.processes.stop(process)
        print(f"  warm-up: api {first_api:.3f} s, by hand {first_raw:.3f} s", flush=True)
        self.post_seconds.clear()

        def api_run() -> None:
            instance_id, seconds = self.api_create(f"boot-{run}")
            api.append(seconds)
            call(self.client, "DELETE", f"/instances/{instance_id}", 204)

        def raw_run() -> None:
            process, seconds = self.raw_boot(f"boot-{run}")
            raw.append(seconds)
            self.processes.stop(process)

        for run in range(runs):
            # Which side goes first alternates, so a drift in machine load favours neither.
            for side in (api_run, raw_run) if run % 2 == 0 else (raw_run, api_run):
                side()
            print(f"  run {run + 1}: api {api[-1]:.3f} s, by hand {raw[-1]:.3f} s", flush=True)
        print(f"\n1. QEMU/TCG create -> Running, {runs} runs each (interleaved)")
        print(f"{'':<28}{'median ms':>10}{'min ms':>10}{'max ms':>10}")
        for label, samples in (("API (POST + GET polling)", api), ("by hand (disks + qemu)", raw)):
            print(
                f"{label:<28}{ms(statistics.median(samples))} {ms(min(samples))} {ms(max(samples))}"
            )
        post = statistics.median(self.post_seconds)
        print(f"{'of which POST /instances':<28}{ms(post)}   (disks, metadata, QEMU up, QMP)")
        ratio = statistics.median(api) / statistics.median(raw)
        ok = ratio <= CREATE_RATIO
        print(f"ratio API/by hand: {ratio:.3f} (target <= {CREATE_RATIO}: {self.verdict(ok)})")

    def standby_section(self, cycles: int) -> None:
        instance_id, _ = self.api_create("standby")
        process, _ = self.raw_boot("standby")
        qmp = Qmp.connect(self.raw.qmp_socket, process)
        timings: dict[str, list[float]] = {
            "API standby": [],
            "raw standby": [],
            "API restore": [],
            "raw restore": [],
        }
        try:
            for cycle in range(cycles):
                time.sleep(0.5)  # let both guests run (and dirty memory) between cycles
                started = time.perf_counter()
                # Each side is measured while the other side's guest runs, so both share
                # the two cores alike.
                started = time.perf_counter()
                body = call(self.client, "POST", f"/instances/{instance_id}/standby", 200)
                timings["API standby"].append(time.perf_counter() - started)
                assert body["state"] == "Standby", body
                started = time.perf_counter()
                body = call(self.client, "POST", f"/instances/{instance_id}/restore", 200)
                timings["API restore"].append(time.perf_counter() - started)
                assert body["state"] == "Running", body

                memory = self.raw.workdir / f"memory-{cycle}"
                timings["raw standby"].append(raw_standby(qmp, process, memory))
                qmp.close()
                serial = self.raw.workdir / f"serial-{cycle + 1}.log"
                started = time.perf_counter()
                process = self.processes.spawn(
                    self.raw.argv(serial, incoming=memory), self.raw.workdir / "qemu.log"
                )
                qmp = Qmp.connect(self.raw.qmp_socket, process)
                raw_restore(qmp)
                timings["raw restore"].append(time.perf_counter() - started)
                memory.unlink()
                print(
                    f"  cycle {cycle + 1}: "
                    + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in timings.items()),
                    flush=True,
                )
        finally:
            qmp.close()
            self.processes.stop(process)
            call(self.client, "DELETE", f"/instances/{instance_id}", 204)
        print(f"\n2. QEMU/TCG standby and restore ({self.memory_mb} MiB guest), {cycles} cycles")
        print(f"{'':<14}{'median ms':>10}{'min ms':>10}{'max ms':>10}")
        for label, samples in timings.items():
            print(
                f"{label:<14}{ms(statistics.median(samples))} {ms(min(samples))} {ms(max(samples))}"
            )
        med = {k: statistics.median(v) for k, v in timings.items()}
        ratio = med["API standby"] / med["raw standby"]
        ok = ratio <= STANDBY_RATIO
        print(f"standby ratio API/raw: {ratio:.3f} (target <= {STANDBY_RATIO}: {self.verdict(ok)})")
        extra_ms = (med["API restore"] - med["raw restore"]) * 1e3
        ok = extra_ms <= RESTORE_EXTRA_MS
        print(
            f"restore API - raw: {extra_ms:+.1f} ms, "
            f"ratio {med['API restore'] / med['raw restore']:.3f}"
            f" (target <= +{RESTORE_EXTRA_MS:.0f} ms: {self.verdict(ok)})"
        )

    def simulator_section(self, cheap: int, heavy: int) -> None:
        client = self.client
        samples: dict[str, list[float]] = {
            op: [] for op in ("create", "get", "list", "pause", "resume", "standby", "restore")
        }

        def timed(op: str, method: str, url: str, expect: int, **kwargs: Any) -> Any:
            started = time.perf_counter()
            result = call(client, method, url, expect, **kwargs)
            samples[op].append(time.perf_counter() - started)
            return result

        ids: list[str] = []
        try:
            for n in range(heavy):
                body = self.create_body(f"sim-{n}", hypervisor="cloud-hypervisor")
                ids.append(timed("create", "POST", "/instances", 201, json=body)["id"])
            first = ids[0]
            for _ in range(cheap):
                timed("get", "GET", f"/instances/{first}", 200)
                timed("list", "GET", "/instances", 200)
                timed("pause", "POST", f"/instances/{first}/pause", 200)
                timed("resume", "POST", f"/instances/{first}/resume", 200)
            for n in range(heavy):
                instance_id = ids[n % len(ids)]
                timed("standby", "POST", f"/instances/{instance_id}/standby", 200)
                timed("restore", "POST", f"/instances/{instance_id}/restore", 200)
            vmm_round_trip = simulator_round_trip(
                Paths(self.data_dir).instance_api_socket(first), cheap
            )
            idle_cpu = cpu_share(self.server_pid, IDLE_SECONDS)
        finally:
            for instance_id in ids:
                client.delete(f"/instances/{instance_id}")
        print(f"\n3. Cloud Hypervisor simulator: request latency on 127.0.0.1 ({heavy} instances)")
        print(f"{'operation':<10}{'n':>5}{'p50 ms':>10}{'p99 ms':>10}  target")
        for op, values in samples.items():
            p50 = percentile(values, 0.5) * 1e3
            target = ""
            if op in ("get", "list", "pause", "resume"):
                target = f"p50 <= {CHEAP_P50_MS:.0f} ms: {self.verdict(p50 <= CHEAP_P50_MS)}"
            p99 = percentile(values, 0.99) * 1e3
            print(f"{op:<10}{len(values):>5}{p50:10.2f}{p99:10.2f}  {target}")
        print(
            f"reference: one vm.info round trip straight to the simulator's socket, p50 "
            f"{percentile(vmm_round_trip, 0.5) * 1e3:.2f} ms (pause and resume make 1; get and "
            f"list make 1 per instance changed since it was last read, here the one paused)"
        )
        print(
            f"dataplane CPU while the {heavy} instances sit idle ({IDLE_SECONDS:.0f} s; their "
            f"logs followed): {idle_cpu * 100:.1f}% of one core"
        )


def cpu_share(pid: int, seconds: float) -> float:
    """The share of one core process ``pid`` used over ``seconds`` (from /proc)."""

    def used() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = used()
    time.sleep(seconds)
    return (used() - before) / seconds


def simulator_round_trip(api_socket: Path, count: int) -> list[float]:
    """What one VMM question costs by itself, to tell it from the dataplane's own time."""
    samples: list[float] = []
    transport = httpx.HTTPTransport(uds=str(api_socket))
    with httpx.Client(transport=transport, base_url="http://localhost/api/v1/") as vmm:
        for _ in range(count):
            started = time.perf_counter()
            response = vmm.get("vm.info")
            samples.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise RuntimeError(f"vm.info answered {response.status_code}")
    return samples


def raw_standby(qmp: Qmp, process: subprocess.Popen[bytes], memory: Path) -> float:
    started = time.perf_counter()
    qmp.execute("stop")
    qmp.execute("migrate", {"uri": f"exec:cat > {memory}"})
    deadline = time.monotonic() + BOUND
    while (status := qmp.execute("query-migrate").get("status")) != "completed":
        if status in ("failed", "cancelled") or time.monotonic() > deadline:
            raise RuntimeError(f"raw migration {status}")
        time.sleep(POLL)
    qmp.execute("quit")
    process.wait(BOUND)
    return time.perf_counter() - started


def raw_restore(qmp: Qmp) -> None:
    deadline = time.monotonic() + BOUND
    while (status := qmp.status()) != "running":
        if status == "paused":
            qmp.execute("cont")
            continue
        if time.monotonic() > deadline:
            raise RuntimeError(f"raw restore stuck in {status}")
        time.sleep(POLL)


@contextlib.contextmanager
def world(tmp: Path, processes: Processes, memory_mb: int, overlay_mb: int) -> Iterator[Bench]:
    artifacts = shared_artifacts()
    with (
        running_registry(tmp / "registry") as registry,
        start_blocking_portal() as portal,
    ):
        image = push_app(
            registry.host, "bench/counter", {"/app/counter": COUNTER}, entrypoint=["/app/counter"]
        )
        env = {
            "HYPERVISOR": "qemu",
            "CLOUD_HYPERVISOR_BIN": str(SIMULATOR),
            "CH_SIMULATOR_VIOLATIONS": str(tmp / "ch-violations.log"),
            "INSECURE_REGISTRIES": registry.host,
            "KERNEL_PATH": str(artifacts.bzimage),
            "INITRD_PATH": str(artifacts.initrd),
        }
        data_dir = tmp / "data"
        vmm_pids: set[int] = set()
        server: RunningServer
        with run_server(data_dir, env) as server:
            client = httpx.Client(base_url=server.url, timeout=BOUND)
            try:
                call(client, "POST", "/images", 202, json={"name": image})
                built = wait_image(client, image)
                raw = RawGuest(
                    artifacts=artifacts,
                    image_disk=Paths(data_dir).image_disk(built["digest"], built["format"]),
                    # What the dataplane derives from the image's config for an instance.
                    config=GuestConfig(
                        entrypoint=("/app/counter",),
                        env={"PATH": "/bin"},
                        workdir="/app",
                        output_transport=output_transport(BackendKind.QEMU),
                    ),
                    memory_mb=memory_mb,
                    overlay_mb=overlay_mb,
                    workdir=tmp / "raw" / "none",
                )
                yield Bench(
                    client,
                    portal,
                    processes,
                    raw,
                    image,
                    memory_mb,
                    overlay_mb,
                    data_dir,
                    server.process.pid,
                )
            except BaseException:
                tail = "\n".join(server.log().splitlines()[-40:])
                print(f"the run failed; the server's log ends with:\n{tail}", file=sys.stderr)
                raise
            finally:
                with contextlib.suppress(httpx.HTTPError):
                    delete_all(client, vmm_pids)
                client.close()
        # VMMs outlive the dataplane by design; any a failed delete left are stopped by PID.
        for pid in vmm_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        violations = tmp / "ch-violations.log"
        if violations.exists() and violations.read_text().strip():
            raise RuntimeError("the simulator saw protocol violations:\n" + violations.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="create -> Running, per side")
    parser.add_argument("--cycles", type=int, default=5, help="standby + restore, per side")
    parser.add_argument("--cheap", type=int, default=50, help="simulator get/list/pause/resume")
    parser.add_argument("--heavy", type=int, default=20, help="simulator create/standby/restore")
    parser.add_argument("--memory-mb", type=int, default=256)
    parser.add_argument("--overlay-mb", type=int, default=1024)
    parser.add_argument(
        "--only", choices=("create", "standby", "simulator"), action="append", default=None
    )
    args = parser.parse_args()
    sections: dict[str, Callable[[Bench], None]] = {
        "create": lambda b: b.create_section(args.runs),
        "standby": lambda b: b.standby_section(args.cycles),
        "simulator": lambda b: b.simulator_section(args.cheap, args.heavy),
    }
    processes = Processes()
    started = time.monotonic()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="lifecycle-bench-") as tmp,
            world(Path(tmp), processes, args.memory_mb, args.overlay_mb) as bench,
        ):
            for name, run in sections.items():
                if args.only is None or name in args.only:
                    run(bench)
            failed = bench.failed
    finally:
        processes.stop_all()
    print(f"\nwhole run: {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
