"""Which kernel modules the guest needs, and the order to load them in.

The order comes from the kernel's own ``modules.dep`` (written by ``depmod``), so nothing
here hard-codes a dependency: a module is loaded after everything it depends on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import KernelModuleError

# What the guest needs, by module name, in groups the init loads when it needs them: "core"
# first (disks must appear), "erofs" only for an erofs disk, "overlay" for the root, "net"
# only with a network config, "console" (the program's output goes to the virtio console)
# just before the program starts, then, right after it started (so that modules the boot
# does not wait for cost the boot nothing), "power" (the ACPI power button and evdev, through
# which the init hears a graceful-stop request) and everything not loaded yet. Dependencies
# (virtio_ring, libcrc32c, failover, …) come from modules.dep. virtio_mmio serves VMMs that
# put devices on MMIO rather than PCI.
GUEST_MODULE_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("virtio_pci", "virtio_mmio", "virtio_blk")),
    ("erofs", ("erofs",)),
    ("overlay", ("overlay",)),
    ("net", ("virtio_net",)),
    ("console", ("virtio_console",)),
    ("power", ("evdev", "button")),
    ("late", ("vmw_vsock_virtio_transport",)),
)
GUEST_MODULES: tuple[str, ...] = tuple(m for _, group in GUEST_MODULE_GROUPS for m in group)


@dataclass(frozen=True, slots=True)
class ModuleIndex:
    """A parsed ``modules.dep`` plus ``modules.builtin`` of one kernel release."""

    release_dir: Path
    depends: dict[str, tuple[str, tuple[str, ...]]]
    """name -> (path relative to release_dir, dependency names)"""
    builtin: frozenset[str]


def _name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def read_index(release_dir: Path) -> ModuleIndex:
    dep_file = release_dir / "modules.dep"
    try:
        text = dep_file.read_text()
    except OSError as exc:
        raise KernelModuleError(f"{dep_file}: {exc.strerror} (was depmod run?)") from exc
    depends: dict[str, tuple[str, tuple[str, ...]]] = {}
    for line in text.splitlines():
        path, sep, deps = line.partition(":")
        if not sep:
            continue
        depends[_name(path)] = (path, tuple(_name(d) for d in deps.split()))
    builtin_file = release_dir / "modules.builtin"
    builtin: set[str] = set()
    if builtin_file.exists():
        builtin = {_name(p) for p in builtin_file.read_text().split()}
    return ModuleIndex(release_dir, depends, frozenset(builtin))


def load_order(index: ModuleIndex, wanted: tuple[str, ...] = GUEST_MODULES) -> list[str]:
    """Module paths (relative to the release dir), each after all of its dependencies."""
    order: list[str] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in chain:
            raise KernelModuleError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        entry = index.depends.get(name)
        if entry is None:
            if name in index.builtin:
                done.add(name)
                return
            raise KernelModuleError(
                f"kernel module {name} is neither in {index.release_dir}/modules.dep nor built in"
            )
        path, deps = entry
        for dep in deps:
            visit(dep, (*chain, name))
        done.add(name)
        order.append(path)

    for name in wanted:
        visit(name, ())
    return order


def grouped_load_order(
    index: ModuleIndex, groups: tuple[tuple[str, tuple[str, ...]], ...] = GUEST_MODULE_GROUPS
) -> list[tuple[str, str]]:
    """(group, module path) pairs; each group holds its dependencies beyond the first group.

    The init loads the first group, then any other group on its own, in any order, so a
    dependency shared by two later groups appears in both (the init loads a path once).
    """
    (first_name, first), *rest = groups
    base = load_order(index, first)
    pairs = [(first_name, path) for path in base]
    for name, wanted in rest:
        pairs += [(name, path) for path in load_order(index, wanted) if path not in base]
    return pairs
