"""The Cloud Hypervisor simulator itself: it rejects what the v53 reference rejects (and records
it so the test that sent it fails), and keeps v53's known differences from the YAML."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from managers.hypervisors import (
    BackendKind,
    DiskSpec,
    NetSpec,
    SpecChanges,
    VmState,
    open_backend,
)
from managers.hypervisors.cloud_hypervisor import ChVmm, parse_major
from tests.support.ch_events import parse_events
from tests.support.hypervisor_guest import GuestKit, test_guest
from tests.support.hypervisor_harness import Harness, harness_for, make_disk

__all__ = ["test_guest"]

pytestmark = pytest.mark.anyio
ID = "inst-sim"


@pytest.fixture
async def harness(
    test_guest: GuestKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Harness]:
    async for value in harness_for("ch-simulator", test_guest, tmp_path, monkeypatch):
        yield value


def raw_client(workdir: Path) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(workdir / "vmm.sock")),
        base_url="http://localhost/api/v1/",
    )


async def test_rejected_requests_answer_400_and_are_recorded(
    harness: Harness, tmp_path: Path
) -> None:
    workdir = tmp_path / "vm"
    harness.track(await harness.backend().start_vmm(ID, workdir))
    async with raw_client(workdir) as client:
        bad_field = await client.put("vm.create", json={"payload": {"kernel": "/k"}, "cpu": {}})
        bad_type = await client.put("vm.create", json={"payload": {"kernel": 7}})
        body_on_bodiless = await client.put("vm.boot", json={})
        wrong_method = await client.get("vm.pause")
    for response in (bad_field, bad_type, body_on_bodiless, wrong_method):
        assert response.status_code == 400
        assert all(isinstance(item, str) for item in response.json())
    assert "'cpu' was unexpected" in bad_field.json()[0]
    assert harness.violations is not None
    recorded = [json.loads(line) for line in harness.violations.read_text().splitlines()]
    assert [entry["path"] for entry in recorded] == [
        "/api/v1/vm.create",
        "/api/v1/vm.create",
        "/api/v1/vm.boot",
        "/api/v1/vm.pause",
    ]
    # Seen and asserted: clear it so the fixture's own check (which fails a test) passes.
    harness.violations.unlink()


async def test_v53_differences_from_the_yaml(harness: Harness, tmp_path: Path) -> None:
    workdir = tmp_path / "vm"
    vmm = harness.track(await harness.backend().start_vmm(ID, workdir))
    async with raw_client(workdir) as client:
        assert (await client.get("vm.info")).status_code == 404
        await vmm.create_and_boot(harness.spec(workdir))
        wrong_state = await client.put("vm.resume")
        assert wrong_state.status_code == 500
        assert isinstance(wrong_state.json(), list)
        restore = await client.put("vm.restore", json={"source_url": f"file://{tmp_path}"})
        assert restore.status_code == 500
        ping = (await client.get("vmm.ping")).json()
        assert ping["version"].startswith("53.")
        shutdown = await client.put("vmm.shutdown")
        assert shutdown.status_code == 200
    assert isinstance(vmm, ChVmm)
    assert await vmm.process.wait_exit(10)


async def test_event_monitor_and_serial_file(harness: Harness, tmp_path: Path) -> None:
    workdir = tmp_path / "vm"
    vmm = harness.track(await harness.backend().start_vmm(ID, workdir))
    spec = harness.spec(workdir)
    await vmm.create_and_boot(spec)
    await vmm.pause()
    await vmm.resume()
    assert await vmm.shutdown(grace_seconds=10)
    text = (workdir / "events.json").read_text()
    assert "\n\n" in text
    assert text.startswith("{\n")
    names = [(event.source, event.event) for event in parse_events(text)]
    assert names[0] == ("vmm", "starting")
    for expected in ("booted", "paused", "resumed", "shutdown"):
        assert ("vm", expected) in names
    assert "[ch-simulator] booted" in spec.serial_file.read_text()


async def test_snapshot_files_and_tap_rewrite(harness: Harness, tmp_path: Path) -> None:
    workdir = tmp_path / "vm"
    backend = harness.backend()
    disk = make_disk(tmp_path / "root.raw")
    spec = harness.spec(workdir, disks=(DiskSpec("root", disk, readonly=True, serial="image"),))
    spec = replace(spec, net=NetSpec(tap="tap-old", mac="52:54:00:12:34:56"))
    vmm = harness.track(await backend.start_vmm(ID, workdir))
    await vmm.create_and_boot(spec)
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    await vmm.snapshot(snapshot)
    assert sorted(p.name for p in snapshot.iterdir()) == [
        "config.json",
        "memory-ranges",
        "state.json",
    ]
    config = json.loads((snapshot / "config.json").read_text())
    assert config["disks"][0]["image_type"] == "Raw"
    assert config["console"] == {"mode": "Off"}
    assert config["serial"]["mode"] == "File"
    await vmm.stop()

    restored = harness.track(
        await backend.restore(ID, workdir, snapshot, SpecChanges(tap="tap-new"))
    )
    assert isinstance(restored, ChVmm)
    assert await restored.state() is VmState.RUNNING
    info = await restored.api().get("vm.info")
    assert info["config"]["net"][0]["tap"] == "tap-new"
    assert json.loads((snapshot / "config.json").read_text())["net"][0]["tap"] == "tap-new"


async def test_a_output_file_follows_a_restore_and_only_where_there_was_one(
    harness: Harness, tmp_path: Path
) -> None:
    workdir = tmp_path / "vm"
    backend = harness.backend()
    spec = replace(harness.spec(workdir), output_file=workdir / "output.raw")
    vmm = harness.track(await backend.start_vmm(ID, workdir))
    await vmm.create_and_boot(spec)
    assert (workdir / "output.raw").is_file(), "Cloud Hypervisor creates it with the devices"
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    await vmm.snapshot(snapshot)
    await vmm.stop()
    config = json.loads((snapshot / "config.json").read_text())
    assert config["console"] == {"mode": "File", "file": str(workdir / "output.raw")}

    moved = tmp_path / "moved"
    moved.mkdir()
    changes = SpecChanges(serial_file=moved / "serial.raw", output_file=moved / "output.raw")
    restored = harness.track(await backend.restore(ID, workdir, snapshot, changes))
    assert isinstance(restored, ChVmm)
    info = await restored.api().get("vm.info")
    assert info["config"]["console"] == {"mode": "File", "file": str(moved / "output.raw")}
    assert (moved / "output.raw").is_file()
    await restored.stop()

    # A VM booted without a console (an older record) restores without one.
    plain = tmp_path / "plain"
    vmm = harness.track(await backend.start_vmm(ID, plain))
    await vmm.create_and_boot(harness.spec(plain))
    old_snapshot = tmp_path / "old-snap"
    old_snapshot.mkdir()
    await vmm.snapshot(old_snapshot)
    await vmm.stop()
    restored = harness.track(await backend.restore(ID, plain, old_snapshot, changes))
    assert isinstance(restored, ChVmm)
    info = await restored.api().get("vm.info")
    assert info["config"]["console"] == {"mode": "Off"}
    assert changes.apply(harness.spec(plain)).output_file is None


async def test_guest_ignoring_the_power_button_is_forced_off(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CH_SIMULATOR_GUEST", "ignore-acpi")
    workdir = tmp_path / "vm"
    vmm = harness.track(await harness.backend().start_vmm(ID, workdir))
    await vmm.create_and_boot(harness.spec(workdir))
    assert await vmm.shutdown(grace_seconds=0.3) is False
    assert await vmm.state() is VmState.SHUTDOWN


def test_simulator_refuses_to_run_outside_tests(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CH_SIMULATOR_VIOLATIONS"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.ch_simulator", "--api-socket", f"path={tmp_path}/s"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "outside tests" in result.stderr
    assert not (tmp_path / "s").exists()


def test_backend_kind_names() -> None:
    assert open_backend("cloud-hypervisor").kind is BackendKind.CLOUD_HYPERVISOR
    with pytest.raises(ValueError, match="unknown hypervisor"):
        open_backend("firecracker")


def test_event_parser_leaves_a_half_written_event() -> None:
    whole = '{\n  "timestamp": {"secs": 1, "nanos": 500000000},\n  "source": "vm",\n'
    whole += '  "event": "booted",\n  "properties": null\n}\n\n'
    events = parse_events(whole + '{\n  "timestamp": {"secs": 2')
    assert [(e.source, e.event, e.seconds) for e in events] == [("vm", "booted", 1.5)]


@pytest.mark.parametrize(
    ("version", "major"), [("53.0.0", 53), ("v53.0-12-gabcdef", 53), ("v41.0", 41), ("dev", None)]
)
def test_version_major(version: str, major: int | None) -> None:
    assert parse_major(version) == major
