"""Instances through the real API on the Cloud Hypervisor simulator, with a real registry.

The simulator runs no guest, so instances stay ``Initializing`` (no program-started
marker ever arrives); what is proved here is the lifecycle, the protocol, the
errors, the logs' event ids, crash safety and the restart of the dataplane.
Every request the simulator receives is checked against Cloud Hypervisor's own
API description; a violation fails the module.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from managers.instances.logs import SegmentedLog
from tests.support.apps import COUNTER, push_app
from tests.support.artifacts import shared_artifacts
from tests.support.registry import running_registry
from tests.support.server import RunningServer, run_server

SIMULATOR = Path(__file__).resolve().parents[1] / "support" / "ch_simulator" / "cloud-hypervisor"


@dataclass
class Source:
    image: str
    env: dict[str, str]


@dataclass
class World:
    server: RunningServer
    client: httpx.Client
    image: str
    data_dir: Path
    env: dict[str, str]


def server_env(tmp: Path, registry_host: str) -> dict[str, str]:
    artifacts = shared_artifacts()
    return {
        "HYPERVISOR": "cloud-hypervisor",
        "CLOUD_HYPERVISOR_BIN": str(SIMULATOR),
        "CH_SIMULATOR_VIOLATIONS": str(tmp / "ch-violations.log"),
        "INSECURE_REGISTRIES": registry_host,
        "KERNEL_PATH": str(artifacts.bzimage),
        "INITRD_PATH": str(artifacts.initrd),
        "SSE_KEEPALIVE_SECONDS": "1",
        # The smallest retention, so a test can rotate a log away with a few megabytes.
        "LOG_RETENTION_BYTES": str(1 << 20),
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    """A registry with the counter image, and the server settings to reach it."""
    tmp = tmp_path_factory.mktemp("instances-api")
    with running_registry(tmp / "registry") as registry:
        image = push_app(
            registry.host, "tests/counter", {"/app/counter": COUNTER}, entrypoint=["/app/counter"]
        )
        yield Source(image, server_env(tmp, registry.host))
    violations = tmp / "ch-violations.log"
    assert not violations.exists() or not violations.read_text().strip(), violations.read_text()


@pytest.fixture(scope="module")
def world(source: Source, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    data_dir = tmp_path_factory.mktemp("instances-world") / "data"
    with (
        run_server(data_dir, source.env) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        response = client.post("/images", json={"name": source.image})
        assert response.status_code == 202, response.text
        wait_ready(client, source.image)
        yield World(server, client, source.image, data_dir, source.env)
        for instance in client.get("/instances").json():
            client.delete(f"/instances/{instance['id']}")


def wait_ready(client: httpx.Client, image: str) -> dict[str, Any]:
    """Follow the image's SSE stream until it is ready (the stream ends by itself)."""
    last: dict[str, Any] = {}
    with client.stream("GET", f"/images/{quote(image, safe='')}/events") as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data: "):
                last = json.loads(line[6:])
    assert last["status"] == "ready", last
    return last


def create(world: World, name: str, **extra: Any) -> httpx.Response:
    return world.client.post("/instances", json={"name": name, "image": world.image, **extra})


def action(world: World, instance_id: str, verb: str) -> httpx.Response:
    return world.client.post(f"/instances/{instance_id}/{verb}")


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (dead, not yet reaped by its parent) is not alive."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def gone(pid: int, within: float = 10.0) -> bool:
    """Whether ``pid`` is gone, waiting up to ``within`` seconds for it to be reaped."""
    deadline = time.monotonic() + within
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_image_is_listed_and_found_by_reference_and_digest(world: World) -> None:
    images = world.client.get("/images").json()
    assert [i["name"] for i in images] == [world.image]
    by_name = world.client.get(f"/images/{quote(world.image, safe='')}").json()
    by_digest = world.client.get(f"/images/{by_name['digest']}").json()
    assert by_name == by_digest
    assert by_name["config"]["entrypoint"] == ["/app/counter"]


def test_full_lifecycle(world: World) -> None:
    response = create(world, "life", env={"GREETING": "hello world"}, memory_mb=128)
    assert response.status_code == 201, response.text
    instance = response.json()
    instance_id = instance["id"]
    assert instance["state"] == "Initializing"
    assert instance["env"] == {"GREETING": "hello world"}
    pid = instance["pid"]
    assert pid_alive(pid)
    assert world.client.get("/instances/life").json()["id"] == instance_id

    assert action(world, instance_id, "pause").json()["state"] == "Paused"
    assert action(world, instance_id, "resume").json()["state"] == "Initializing"

    standby = action(world, instance_id, "standby")
    assert standby.status_code == 200, standby.text
    assert standby.json()["state"] == "Standby"
    assert standby.json()["pid"] is None
    assert gone(pid)
    assert (world.data_dir / "instances" / instance_id / "standby" / "config.json").is_file()

    restored = action(world, instance_id, "restore")
    assert restored.status_code == 200, restored.text
    assert restored.json()["state"] == "Initializing"
    assert not (world.data_dir / "instances" / instance_id / "standby").exists()

    stopped = action(world, instance_id, "stop").json()
    assert stopped["state"] == "Stopped"
    assert action(world, instance_id, "start").json()["state"] == "Initializing"

    listed = world.client.get("/instances", params={"state": "Initializing"}).json()
    assert instance_id in [i["id"] for i in listed]
    assert world.client.delete(f"/instances/{instance_id}").status_code == 204
    assert not (world.data_dir / "instances" / instance_id).exists()
    assert world.client.get(f"/instances/{instance_id}").status_code == 404


def test_created_without_start_boots_later(world: World) -> None:
    instance = create(world, "lazy", start=False).json()
    assert instance["state"] == "Created"
    assert instance["pid"] is None
    assert action(world, instance["id"], "start").json()["state"] == "Initializing"
    world.client.delete(f"/instances/{instance['id']}")


def test_wrong_state_actions_are_409_with_the_current_state(world: World) -> None:
    instance = create(world, "states").json()
    for verb in ("resume", "restore", "start"):
        response = action(world, instance["id"], verb)
        assert response.status_code == 409, verb
        body = response.json()
        assert body["code"] == "wrong_state"
        assert body["details"]["state"] == "Initializing"
    world.client.delete(f"/instances/{instance['id']}")


def snapshot_of_disk(world: World) -> dict[str, bytes]:
    """Every instance folder and its metadata (logs move on their own and are left out)."""
    root = world.data_dir / "instances"
    return {p.name: (p / "metadata.json").read_bytes() for p in root.iterdir()}


def test_bad_requests_change_nothing(world: World) -> None:
    keeper = create(world, "keeper").json()
    before = snapshot_of_disk(world)
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"name": "keeper", "image": world.image}, 409, "instance_exists"),
        ({"name": "ghost", "image": "127.0.0.1:1/none/such:v1"}, 404, "image_not_found"),
        ({"name": "Bad_Name", "image": world.image}, 400, "invalid_request"),
        (
            {"name": "big", "image": world.image, "memory_mb": 512, "memory_max_mb": 256},
            400,
            "invalid_instance",
        ),
        ({"name": "x", "image": world.image, "vcpus": 0}, 400, "invalid_request"),
        ({"name": "x", "image": world.image, "surprise": True}, 400, "invalid_request"),
        # A pattern's `$` ends the string (JSON Schema's regexes), not a final newline.
        ({"name": "web\n", "image": world.image}, 400, "invalid_request"),
        ({"name": "x", "image": world.image, "env": {"PATH\n": "/bin"}}, 400, "invalid_request"),
    ]
    for body, status, code in cases:
        response = world.client.post("/instances", json=body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["code"] == code
    assert (
        world.client.post(
            "/instances", content=b"{oops", headers={"content-type": "application/json"}
        ).status_code
        == 400
    )
    assert world.client.get("/instances/no-such-thing").status_code == 404
    assert action(world, "no-such-thing", "stop").status_code == 404
    assert action(world, keeper["id"], "explode").status_code == 400
    assert snapshot_of_disk(world) == before
    world.client.delete(f"/instances/{keeper['id']}")


def test_an_image_in_use_cannot_be_deleted(world: World) -> None:
    instance = create(world, "user").json()
    response = world.client.delete(f"/images/{quote(world.image, safe='')}")
    assert response.status_code == 409
    assert response.json()["code"] == "image_in_use"
    world.client.delete(f"/instances/{instance['id']}")


def test_twenty_parallel_creates(world: World) -> None:
    names = [f"par-{n}" for n in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(lambda name: create(world, name), names))
    assert [r.status_code for r in responses] == [201] * 20, [
        r.text for r in responses if r.status_code != 201
    ]
    ids = [r.json()["id"] for r in responses]
    assert len(set(ids)) == 20
    with ThreadPoolExecutor(max_workers=20) as pool:
        deleted = list(pool.map(lambda i: world.client.delete(f"/instances/{i}"), ids))
    assert [r.status_code for r in deleted] == [204] * 20


def test_logs_resume_from_last_event_id(world: World) -> None:
    instance = create(world, "logs").json()
    url = f"/instances/{instance['id']}/logs"
    console = {"source": "console"}
    first = parse_events(world.client.get(url, params=console).text)
    assert first, "the simulator writes a boot line to the serial file"
    assert world.client.get(url, params={"source": "app"}).status_code == 200
    vmm = world.client.get(url, params={"source": "vmm"})
    assert vmm.status_code == 200
    ours = [
        text for _, text in parse_events(world.client.get(url, params={"source": "dataplane"}).text)
    ]
    assert any("created instance" in text and instance["id"] in text for text in ours), ours
    last_id = first[-1][0]
    resumed = world.client.get(url, params=console, headers={"Last-Event-ID": str(last_id)})
    assert parse_events(resumed.text) == []
    tail = parse_events(world.client.get(url, params={**console, "tail": 1}).text)
    assert tail == first[-1:]
    assert world.client.get(url, params={"source": "nope"}).status_code == 400
    world.client.delete(f"/instances/{instance['id']}")


def test_an_idle_follower_gets_keepalive_comments(world: World) -> None:
    instance = create(world, "quiet").json()
    url = f"/instances/{instance['id']}/logs"
    seen: list[str] = []
    with world.client.stream("GET", url, params={"follow": "true", "source": "vmm"}) as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            seen.append(line)
            if line == ": keep-alive":
                break
    assert ": keep-alive" in seen
    # The server is unaffected by a follower that went away.
    assert world.client.get(f"/instances/{instance['id']}").status_code == 200
    world.client.delete(f"/instances/{instance['id']}")


def parse_events(body: str) -> list[tuple[int, str]]:
    events = []
    for block in body.split("\n\n"):
        fields = dict(
            line.split(": ", 1)
            for line in block.splitlines()
            if ": " in line and not line.startswith(":")
        )
        if "id" in fields:
            events.append((int(fields["id"]), fields.get("data", "")))
    return events


def test_restart_keeps_running_and_standby_instances(source: Source, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with (
        run_server(data_dir, source.env, keep_vmms=True) as first,
        httpx.Client(base_url=first.url, timeout=60) as client,
    ):
        client.post("/images", json={"name": source.image})
        wait_ready(client, source.image)
        running = client.post("/instances", json={"name": "survivor", "image": source.image}).json()
        sleeping = client.post("/instances", json={"name": "sleeper", "image": source.image}).json()
        assert client.post(f"/instances/{sleeping['id']}/standby").json()["state"] == "Standby"
        assert first.stop() == 0
    pid = running["pid"]
    assert pid_alive(pid), "a VMM must outlive the dataplane"
    with (
        run_server(data_dir, source.env) as again,
        httpx.Client(base_url=again.url, timeout=60) as client,
    ):
        survivor = client.get(f"/instances/{running['id']}").json()
        assert survivor["state"] == "Initializing"
        assert survivor["pid"] == pid
        assert client.get(f"/instances/{sleeping['id']}").json()["state"] == "Standby"
        assert client.post(f"/instances/{sleeping['id']}/restore").json()["state"] == "Initializing"
        for instance_id in (running["id"], sleeping["id"]):
            assert client.delete(f"/instances/{instance_id}").status_code == 204
    assert gone(pid)


def test_an_unreadable_instance_is_quarantined_not_deleted(source: Source, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    unborn = data_dir / "instances" / "fedcba987654"  # killed inside its first record write
    (unborn / "logs").mkdir(parents=True)
    (unborn / ".metadata.json.x1y2.tmp").write_bytes(b'{"id": "fedc')
    damaged = data_dir / "instances" / "0123456789ab"
    (damaged / "logs").mkdir(parents=True)
    (damaged / "overlay.raw").write_bytes(b"guest data")
    (damaged / "metadata.json").write_bytes(b'{"id": "0123456789ab", "na')
    with run_server(data_dir, source.env) as server:
        listed = httpx.get(f"{server.url}/instances").json()
        assert [item["id"] for item in listed] == ["0123456789ab"]
        (item,) = listed
        assert item["state"] == "Unknown"
        assert item["name"] is None
        assert item["image"] is None
        quarantine = item["quarantine"]
        assert "unreadable" in quarantine["reason"]
        moved = Path(quarantine["path"])
        assert moved.parent == data_dir / "quarantine" / "instances"
        assert (moved / "overlay.raw").read_bytes() == b"guest data"
        assert httpx.get(f"{server.url}/instances/0123456789ab").json() == item
        refused = httpx.delete(f"{server.url}/instances/0123456789ab")
        assert refused.status_code == 409
        assert refused.json()["code"] == "instance_quarantined"
        assert str(moved) in refused.json()["message"]
        # The operator removes it by hand; from then on it is not listed.
        for child in sorted(moved.rglob("*"), reverse=True):
            child.rmdir() if child.is_dir() else child.unlink()
        moved.rmdir()
        assert httpx.get(f"{server.url}/instances").json() == []
    assert not unborn.exists()
    assert not damaged.exists()


def test_a_name_never_shadows_an_id(world: World) -> None:
    client = world.client
    first = client.post(
        "/instances", json={"name": "shadowed", "image": world.image, "start": False}
    ).json()
    refused = client.post(
        "/instances", json={"name": first["id"], "image": world.image, "start": False}
    )
    assert refused.status_code == 409
    assert refused.json()["code"] == "instance_exists"
    assert client.get(f"/instances/{first['id']}").json()["name"] == "shadowed"
    assert client.delete(f"/instances/{first['id']}").status_code == 204


def test_guest_data_is_readable_by_root_alone(world: World) -> None:
    client = world.client
    created = client.post("/instances", json={"name": "private", "image": world.image}).json()
    folder = world.data_dir / "instances" / created["id"]
    try:
        socket_mode = (folder / "vmm.sock").stat().st_mode & 0o777
        assert client.post(f"/instances/{created['id']}/standby").status_code == 200
        assert world.data_dir.stat().st_mode & 0o777 == 0o700
        assert folder.stat().st_mode & 0o777 == 0o700
        assert socket_mode == 0o600
        files = [path for path in folder.rglob("*") if path.is_file()]
        names = {path.name for path in files}
        assert {"overlay.raw", "config.img", "metadata.json"} <= names
        assert any(path.parent.name == "standby" for path in files)
        assert any(path.parent.name == "logs" for path in files)
        loose = {str(path): oct(path.stat().st_mode & 0o777) for path in files}
        assert {path: mode for path, mode in loose.items() if mode != "0o600"} == {}
        for path in folder.rglob("*"):
            if path.is_dir():
                assert path.stat().st_mode & 0o077 == 0, path
    finally:
        assert client.delete(f"/instances/{created['id']}").status_code == 204


@pytest.mark.parametrize(
    "damage",
    [b"", b'{"kind": "cloud-hyp', b'{"kind": "cloud-hypervisor"}', b"\xff\xfe not json"],
    ids=["empty", "truncated", "no-pid", "binary"],
)
def test_a_damaged_vmm_record_shows_unknown_and_stop_ends_the_vmm(
    source: Source, tmp_path: Path, damage: bytes
) -> None:
    data_dir = tmp_path / "data"
    with (
        run_server(data_dir, source.env, keep_vmms=True) as first,
        httpx.Client(base_url=first.url, timeout=60) as client,
    ):
        client.post("/images", json={"name": source.image})
        wait_ready(client, source.image)
        running = client.post("/instances", json={"name": "marked", "image": source.image}).json()
        # The log pump's records too: damaged, they only cost where the pump had got to.
        folder = data_dir / "instances" / running["id"]
        assert first.stop() == 0
    (folder / "vmm.json").write_bytes(damage)
    (folder / "guest.json").write_bytes(damage)
    (folder / "logs" / "pump.json").write_bytes(damage)
    pid = running["pid"]
    with (
        run_server(data_dir, source.env) as again,
        httpx.Client(base_url=again.url, timeout=60) as client,
    ):
        seen = client.get(f"/instances/{running['id']}").json()
        assert seen["state"] == "Unknown", "a VMM runs that cannot be driven: said, not hidden"
        assert pid_alive(pid)
        assert client.post(f"/instances/{running['id']}/stop").json()["state"] == "Stopped"
        assert gone(pid)
        assert client.post(f"/instances/{running['id']}/start").status_code == 200
        assert client.delete(f"/instances/{running['id']}").status_code == 204
    assert not (data_dir / "quarantine").exists()


def test_an_image_stream_ends_for_good_under_eventsource_rules(world: World) -> None:
    url = f"/images/{quote(world.image, safe='')}/events"
    body = world.client.get(url).text
    blocks = [block.splitlines() for block in body.split("\n\n") if block.strip()]
    assert blocks[0][0].startswith("retry: ")
    assert blocks[-1][:2] == ["id: ready", "event: image"]
    assert json.loads(blocks[-1][2].removeprefix("data: "))["status"] == "ready"
    # What an EventSource does after the stream ends: reconnect with the last id. 204 stops it.
    again = world.client.get(url, headers={"Last-Event-ID": "ready"})
    assert again.status_code == 204, again.text
    # A client that left before the end still gets it.
    behind = world.client.get(url, headers={"Last-Event-ID": "pulling.2"})
    assert behind.status_code == 200
    assert "id: ready" in behind.text


def test_a_resume_is_told_of_a_gap_starts_at_a_line_and_ends_with_204(world: World) -> None:
    instance = create(world, "rotated").json()
    assert world.client.post(f"/instances/{instance['id']}/stop").status_code == 200
    # Nothing writes the stopped instance's app log now; fill it as its pump would, past the
    # 1 MiB retention the server runs with.
    log = SegmentedLog(
        world.data_dir / "instances" / instance["id"] / "logs", "app", retention_bytes=1 << 20
    )
    for n in range(30_000):
        log.append(f"line {n:05d} ".encode() + b"x" * 88 + b"\n")
    url = f"/instances/{instance['id']}/logs"

    body = world.client.get(url, headers={"Last-Event-ID": "5"}).text
    assert body.startswith("retry: ")
    blocks = [block for block in body.split("\n\n") if block.strip()]
    assert blocks[1].splitlines()[0] == "event: gap", blocks[:3]
    gap = json.loads(blocks[1].splitlines()[1].removeprefix("data: "))
    assert gap == {"dropped_bytes": log.start() - 5, "resumed_at": log.start()}
    events = parse_events(body)
    assert events[-1][1].startswith("line 29999 ")
    assert len(events) < 30_000, "rotation kept only the last megabyte or so"

    # An id inside a line resumes at the next line.
    (first_id, _), _, (third_id, third) = events[:3]
    resumed = parse_events(world.client.get(url, headers={"Last-Event-ID": str(first_id + 3)}).text)
    assert resumed[0] == (third_id, third)
    assert resumed[-1] == events[-1]

    # The follow ends (the instance is stopped); its reconnect gets 204 and stops there.
    followed = world.client.get(
        url, params={"follow": "true"}, headers={"Last-Event-ID": str(events[-2][0])}
    )
    assert parse_events(followed.text) == events[-1:]
    assert "event: end" in followed.text
    again = world.client.get(
        url, params={"follow": "true"}, headers={"Last-Event-ID": str(events[-1][0])}
    )
    assert again.status_code == 204, again.text

    text = world.client.get(url, params={"format": "text", "tail": 3})
    assert text.status_code == 200
    assert text.headers["content-type"].startswith("text/plain")
    assert text.text.splitlines() == [line for _, line in events[-3:]]
    world.client.delete(f"/instances/{instance['id']}")


def test_raw_ranges_are_exact_bytes_by_offset(world: World) -> None:
    instance = create(world, "binary").json()
    assert world.client.post(f"/instances/{instance['id']}/stop").status_code == 200
    log = SegmentedLog(
        world.data_dir / "instances" / instance["id"] / "logs", "app", retention_bytes=1 << 20
    )
    blob = bytes(range(256)) * 4 + b"\r\n\xff\xfe no newline"
    log.append(blob)
    url = f"/instances/{instance['id']}/logs"

    def raw(wanted: str | None = None, **params: str) -> httpx.Response:
        headers = {"Range": wanted} if wanted else {}
        return world.client.get(url, params={"format": "raw", **params}, headers=headers)

    whole = raw()
    assert whole.status_code == 200
    assert whole.content == blob
    assert whole.headers["log-offset"] == "0"
    assert raw(follow="true").content == blob, "a follow of a stopped instance ends at once"
    end = len(blob)
    middle = raw("bytes=10-19")
    assert middle.status_code == 206
    assert middle.content == blob[10:20]
    assert middle.headers["content-range"] == f"bytes 10-19/{end}"
    assert raw("bytes=-5").content == blob[-5:]
    assert raw(f"bytes={end - 3}-").content == blob[-3:]
    assert raw(f"bytes=0-{end + 100}").content == blob, "a last byte past the end is clipped"
    for unsatisfiable in (f"bytes={end}-", "bytes=-0"):
        refused = raw(unsatisfiable)
        assert refused.status_code == 416, unsatisfiable
        assert refused.json()["code"] == "range_not_satisfiable"
        assert refused.json()["details"] == {"kept_from": 0, "end": end}
        assert refused.headers["content-range"] == f"bytes */{end}"
    # As HTTP allows, what is not one range of bytes is ignored: the whole log, 200.
    for ignored in ("bytes=5-2", "bytes=1-2,4-5", "lines=1-2", "0"):
        answer = raw(ignored)
        assert (answer.status_code, answer.content) == (200, blob), ignored
    followed = raw("bytes=0-1", follow="true")
    assert (followed.status_code, followed.content) == (200, blob)
    # Last-Event-ID, taken as an exact offset.
    resumed = world.client.get(url, params={"format": "raw"}, headers={"Last-Event-ID": "1000"})
    assert resumed.content == blob[1000:]
    assert resumed.headers["log-offset"] == "1000"

    # Bytes rotated away are no longer a range of the log.
    for _ in range(20_000):
        log.append(b"y" * 99 + b"\n")
    refused = raw("bytes=0-9")
    assert refused.status_code == 416
    kept = refused.json()["details"]["kept_from"]
    assert kept > 0
    assert kept == log.start()
    assert raw(f"bytes={kept}-{kept + 9}").content == log.read_bytes(kept, 10)[1]
    world.client.delete(f"/instances/{instance['id']}")


def test_a_follow_of_an_instance_with_no_vmm_ends_after_its_backlog(world: World) -> None:
    instance = create(world, "resting").json()
    assert world.client.post(f"/instances/{instance['id']}/stop").status_code == 200
    url = f"/instances/{instance['id']}/logs"
    body = world.client.get(url, params={"follow": "true", "source": "dataplane"}).text
    blocks = [block for block in body.split("\n\n") if block.strip()]
    assert blocks, body
    *lines, last = blocks
    assert lines, "the backlog comes first"
    assert last.splitlines()[0] == "event: end", body[-300:]
    end = json.loads(last.splitlines()[1].removeprefix("data: "))
    assert end == {"state": "Stopped", "exit_code": None, "error": None}
    world.client.delete(f"/instances/{instance['id']}")
