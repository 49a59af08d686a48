"""Benchmark: cold pull -> ready disk, against the hand pipeline, and a warm re-pull.

Generates two images and pushes them to a local ``docker-registry`` on 127.0.0.1: a ~200 MB
multi-layer one (mostly small files, like a distribution's /usr), and one layer of
``--small-files`` files of 0.1-3 KB (like a ``node_modules``). For each, in one run, it measures
(each ``--rounds`` times, alternating, best kept):

* hand:  ``skopeo copy`` + ``umoci unpack --rootless`` + ``mkfs.erofs``
* cold:  ``ImageManager.request`` on an empty data dir until the image is ready
* warm:  ``ImageManager.request`` of the same tag again, the image already ready

and prints the ratios. Targets: cold/hand <= 1.0 (<= 0.8 for the small files), warm/cold < 0.05.

Then, with the multi-layer image's layers:

* config-only variants: four images of the same layers with different entrypoints and env,
  pulled one after the other; the bytes their disks take (blocks of distinct inodes) against
  one disk. Target: the size of one disk.
* erofs compression: the same unpacked tree (plus busybox, to read it) made into disks
  uncompressed, lz4 and lz4hc: size, ``mkfs.erofs`` time, and for each a QEMU/TCG guest booted
  by hand from it until its program starts, and until that program has read every file
  (``cat`` to ``/dev/null``); best of ``--rounds``. What the disk builder uses follows from this
  (``managers/images/README.md``).

    .venv/bin/python scripts/bench/images.py [--size-mb 200] [--layers 5] [--rounds 2]
                                             [--small-files 50000] [--disk-scratch]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from anyio.from_thread import start_blocking_portal
from lifecycle import EXITED, Processes, RawGuest, wait_marker

from managers.guest import GuestConfig
from managers.images import ImageManager, ImageStatus
from managers.images.scratch import DEFAULT_SCRATCH
from managers.paths import Paths
from tests.support.apps import busybox_layers
from tests.support.artifacts import shared_artifacts
from tests.support.oci_builder import LayerBuilder, Pusher, make_image
from tests.support.registry import running_registry

REPO = "bench/big"
VARIANTS_REPO = "bench/variant"
READ_REPO = "bench/readable"
SMALL_REPO = "bench/small"
# File sizes and their weights: mostly small files, like a distribution's /usr (~3,500 files).
_SIZES = (2_000, 8_000, 30_000, 120_000, 2_000_000)
_WEIGHTS = (40, 30, 20, 8, 2)
TAG = "v1"


def _content(rng: random.Random, size: int) -> bytes:
    """Half random, half repetitive text: compresses about 2:1 like real binaries and libraries."""
    half = size // 2
    text = (b"lorem ipsum dolor sit amet %d\n" % rng.randrange(1000)) * (half // 28 + 1)
    return rng.randbytes(half) + text[: size - half]


def generate_layers(size_mb: int, layers: int) -> list[tuple[bytes, str]]:
    rng = random.Random(42)
    per_layer = size_mb * (1 << 20) // layers
    built = []
    files = 0
    for n in range(layers):
        layer = LayerBuilder().dir(f"layer{n}")
        remaining = per_layer
        i = 0
        while remaining > 0:
            # Mostly small files (like /usr/lib, /usr/share) plus some large ones.
            size = rng.choices(_SIZES, _WEIGHTS)[0]
            size = min(size, remaining)
            directory = f"layer{n}/d{i % 40}"
            if i < 40:
                layer.dir(directory)
            layer.file(f"{directory}/f{i}", _content(rng, size), mode=rng.choice((0o644, 0o755)))
            remaining -= size
            i += 1
        files += i
        if n:
            layer.whiteout(f"layer{n - 1}/d0/f0")
        built.append(layer.build(level=1))
    print(f"generated {files} files")
    return built


def small_files_layer(count: int) -> tuple[bytes, str]:
    """One layer of ``count`` files of 0.1-3 KB, a hundred to a directory."""
    rng = random.Random(7)
    layer = LayerBuilder().dir("node_modules")
    for i in range(count):
        if i % 100 == 0:
            layer.dir(f"node_modules/pkg{i // 100}")
        layer.file(f"node_modules/pkg{i // 100}/f{i}.js", rng.randbytes(rng.randint(100, 3000)))
    return layer.build(level=6)


def hand_pipeline(host: str, work: Path, repo: str) -> float:
    layout, bundle, disk = work / "oci", work / "bundle", work / "hand.erofs"
    work.mkdir(parents=True)
    start = time.perf_counter()
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--src-tls-verify=false",
         f"docker://{host}/{repo}:{TAG}", f"oci:{layout}:{TAG}"],
        check=True,
    )  # fmt: skip
    subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{layout}:{TAG}", str(bundle)], check=True
    )
    subprocess.run(["mkfs.erofs", "--quiet", str(disk), str(bundle / "rootfs")], check=True)
    elapsed = time.perf_counter() - start
    print(f"  hand disk: {disk.stat().st_size / (1 << 20):.0f} MB")
    shutil.rmtree(work, ignore_errors=True)
    return elapsed


async def ours(host: str, work: Path, ram_scratch: bool, repo: str) -> tuple[float, float]:
    name = f"{host}/{repo}:{TAG}"
    scratch = DEFAULT_SCRATCH if ram_scratch else None
    manager = ImageManager(Paths(work), insecure_registries=frozenset({host}), scratch_dir=scratch)
    async with manager:
        start = time.perf_counter()
        requested = await manager.request(name)
        async for image in manager.subscribe(requested.digest):
            final = image
        cold = time.perf_counter() - start
        if final.status != ImageStatus.READY:
            raise SystemExit(f"build failed: {final.error}")
        start = time.perf_counter()
        again = await manager.request(name)
        warm = time.perf_counter() - start
        assert again.status == ImageStatus.READY
        assert final.disk_path is not None
        print(f"  our disk: {final.disk_path.stat().st_size / (1 << 20):.0f} MB")
    shutil.rmtree(work, ignore_errors=True)
    return cold, warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--small-files", type=int, default=50_000)
    parser.add_argument(
        "--disk-scratch", action="store_true", help="unpack under DATA_DIR, not in /dev/shm"
    )
    args = parser.parse_args()
    for tool in ("docker-registry", "skopeo", "umoci", "mkfs.erofs"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is required")
    with tempfile.TemporaryDirectory(prefix="bench-images-") as tmp:
        root = Path(tmp)
        with running_registry(root / "registry") as registry:
            t0 = time.perf_counter()
            layers = generate_layers(args.size_mb, args.layers)
            image = make_image(layers)
            pusher = Pusher(registry.host)
            pusher.image(REPO, TAG, image)
            pusher.close()
            compressed = sum(len(blob) for blob, _ in layers) / (1 << 20)
            print(
                f"image: {args.layers} layers, {args.size_mb} MB unpacked, {compressed:.0f} MB "
                f"compressed (generated and pushed in {time.perf_counter() - t0:.1f} s)"
            )
            small = small_files_layer(args.small_files)
            pusher = Pusher(registry.host)
            pusher.image(SMALL_REPO, TAG, make_image([small]))
            pusher.close()
            print(f"image: one layer of {args.small_files} small files")
            cases = [
                (REPO, "the multi-layer image", 1.0),
                (SMALL_REPO, f"{args.small_files} small files", 0.8),
            ]
            results = {
                repo: measure(registry.host, root, repo, args.rounds, not args.disk_scratch)
                for repo, _, _ in cases
            }
            variants_ok = config_variants(registry.host, root, layers)
            compression(registry.host, root, layers, args.rounds)
    for repo, label, target in cases:
        hand, cold, warm = results[repo]
        print(f"== {label} ==")
        print(f"hand pipeline (skopeo copy + umoci unpack --rootless + mkfs.erofs): {hand:.2f} s")
        print(
            f"cold pull -> ready:  {cold:.2f} s   ratio cold/hand = {cold / hand:.2f} "
            f"(target <= {target})"
        )
        print(
            f"warm re-pull:        {warm * 1000:.1f} ms  ratio warm/cold = {warm / cold:.4f}",
            end="",
        )
        print(" (target < 0.05)")
    print(f"cpu cores: {os.cpu_count()}")
    if not variants_ok:
        raise SystemExit(1)


def config_variants(host: str, root: Path, layers: list[tuple[bytes, str]]) -> bool:
    """Four images of the same layers, differing in config: bytes on disk against one disk."""
    pusher = Pusher(host)
    names = []
    for n in range(4):
        config = {"Entrypoint": [f"/bin/run-{n}"], "Env": [f"VARIANT={n}"]}
        pusher.image(VARIANTS_REPO, f"v{n}", make_image(layers, config=config))
        names.append(f"{host}/{VARIANTS_REPO}:v{n}")
    pusher.close()

    async def pull_all(work: Path) -> tuple[int, int]:
        manager = ImageManager(Paths(work), insecure_registries=frozenset({host}))
        async with manager:
            disks = []
            for name in names:
                requested = await manager.request(name)
                async for image in manager.subscribe(requested.digest):
                    final = image
                if final.status != ImageStatus.READY or final.disk_path is None:
                    raise SystemExit(f"build failed: {final.error}")
                disks.append(final.disk_path)
            seen: dict[int, int] = {}
            for disk in disks:
                st = disk.stat()
                seen[st.st_ino] = st.st_blocks * 512
            one = disks[0].stat().st_blocks * 512
        return sum(seen.values()), one

    used, one = anyio.run(pull_all, root / "variants")
    shutil.rmtree(root / "variants", ignore_errors=True)
    ok = used <= one
    print("== 4 config-only variants ==")
    print(
        f"disks take {used / (1 << 20):.1f} MB; one disk is {one / (1 << 20):.1f} MB "
        f"(target: the size of one disk: {'ok' if ok else 'MISSED'})"
    )
    return ok


def compression(host: str, root: Path, layers: list[tuple[bytes, str]], rounds: int) -> None:
    """erofs uncompressed, lz4 and lz4hc from one tree: size, mkfs time, boot and read."""
    reader = "#!/bin/sh\ncat /layer*/d*/* > /dev/null\n"
    image = make_image(
        [*busybox_layers({"/app/read": reader}), *layers],
        config={"Entrypoint": ["/app/read"], "Env": ["PATH=/bin"]},
    )
    pusher = Pusher(host)
    pusher.image(READ_REPO, TAG, image)
    pusher.close()
    work = root / "compression"
    layout, bundle = work / "oci", work / "bundle"
    work.mkdir()
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--src-tls-verify=false",
         f"docker://{host}/{READ_REPO}:{TAG}", f"oci:{layout}:{TAG}"],
        check=True,
    )  # fmt: skip
    subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{layout}:{TAG}", str(bundle)], check=True
    )
    artifacts = shared_artifacts()
    kinds = {"uncompressed": [], "lz4": ["-zlz4"], "lz4hc": ["-zlz4hc"]}
    rows = []
    processes = Processes()
    try:
        with start_blocking_portal() as portal:
            for kind, options in kinds.items():
                disk = work / f"{kind}.erofs"
                began = time.perf_counter()
                subprocess.run(
                    ["mkfs.erofs", "--quiet", *options, str(disk), str(bundle / "rootfs")],
                    check=True,
                )
                build = time.perf_counter() - began
                guest = RawGuest(
                    artifacts=artifacts,
                    image_disk=disk,
                    config=GuestConfig(entrypoint=("/app/read",), env={"PATH": "/bin"}),
                    memory_mb=512,
                    overlay_mb=256,
                    workdir=work / kind,
                )
                boots, reads = [], []
                for round_ in range(rounds):
                    guest.overlay.unlink(missing_ok=True)  # each boot on a fresh overlay
                    guest.make_disks(portal)
                    serial = guest.workdir / f"serial-{round_}.log"
                    began = time.perf_counter()
                    process = processes.spawn(guest.argv(serial), guest.workdir / "qemu.log")
                    try:
                        wait_marker(serial, process)
                        boots.append(time.perf_counter() - began)
                        wait_marker(serial, process, EXITED)
                        reads.append(time.perf_counter() - began)
                    finally:
                        processes.stop(process)
                rows.append((kind, disk.stat().st_blocks * 512, build, min(boots), min(reads)))
    finally:
        processes.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0]
    print("== erofs compression, one tree ==")
    print(
        f"{'disk':<14}{'MB':>8}{'mkfs s':>9}{'boot s':>9}{'read all s':>12}{'vs uncompressed':>18}"
    )
    for kind, size, build, boot, read in rows:
        ratio = f"boot {boot / base[3]:.2f}, read {read / base[4]:.2f}"
        print(f"{kind:<14}{size / (1 << 20):8.0f}{build:9.2f}{boot:9.2f}{read:12.2f}  {ratio}")


def measure(
    host: str, root: Path, repo: str, rounds: int, ram_scratch: bool
) -> tuple[float, float, float]:
    """Best (hand, cold, warm) seconds over ``rounds``, hand and ours alternating."""
    hand_times, cold_times, warm_times = [], [], []
    for round_ in range(rounds):
        work = root / repo.replace("/", "-")
        hand_times.append(hand_pipeline(host, work / f"hand{round_}", repo))
        cold, warm = anyio.run(ours, host, work / f"ours{round_}", ram_scratch, repo)
        cold_times.append(cold)
        warm_times.append(warm)
        print(
            f"{repo} round {round_ + 1}: hand {hand_times[-1]:.2f} s, cold {cold:.2f} s, "
            f"warm {warm * 1000:.1f} ms"
        )
    return min(hand_times), min(cold_times), min(warm_times)


if __name__ == "__main__":
    main()
