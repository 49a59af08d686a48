"""The one module that knows the on-disk layout under ``DATA_DIR``.

Every other module asks a :class:`Paths` for a location instead of joining
strings itself, so the layout can change in one place. Nothing here touches
the disk except :meth:`Paths.ensure`, which creates the top-level folders.

Layout::

    system/kernel/            vmlinux (PVH ELF), bzImage, version, tree/ (the unpacked package),
                              override/ (vmlinux files extracted from a KERNEL_PATH bzImage)
    system/initrd/            initrd.img and the hash of its inputs
    system/oci/               one content-addressed OCI layout shared by all images
    system/tmp/               scratch space for builds (emptied at start-up)
    images/<digest-hex>/      metadata.json, rootfs.erofs | rootfs.ext4
    images/tags/              a reference name -> digest map, one file per name
    instances/<id>/           metadata.json, overlay.raw, config.img, vmm.sock, agent.sock,
                              vmm.json, events.json (Cloud Hypervisor), guest.json, standby/ (and
                              standby.partial/ while one is written),
                              logs/ (serial.raw, output.raw and vmm.log as the VMM
                              writes them; app-*.log, console-*.log, vmm-*.log,
                              dataplane-*.log segments; pump.json)
    instances/.deleting-<id>-<hex>/
                              an instance folder a delete is removing
    volumes/<id>/             metadata.json, data.raw (sparse ext4)
    volumes/.creating-<id>/, .staging-<id>-<hex>/, .deleting-<id>-<hex>/
                              a volume being built, a tree being unpacked for one, a volume a
                              delete is removing (all removed at start-up)
    ingresses/<id>/           metadata.json: one host port forwarded to an instance's port
    ingresses/.creating-<id>/, .deleting-<id>-<hex>/
                              an ingress being recorded, one a delete is removing (both
                              removed at start-up)
    quarantine/<kind>/<name>-<UTC time>/
                              a folder whose record could not be read, moved here whole
                              (disks included) with a QUARANTINE.json saying why; only an
                              operator removes it

Outside ``DATA_DIR``, ``/run/dataplane/`` holds facts of the current host boot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

RUN_DIR = Path("/run/dataplane")

# A VMM's files inside its instance folder; ``hypervisors.layout.VmmFiles`` builds on these.
VMM_SOCKET = "vmm.sock"
VMM_EVENTS = "events.json"
VMM_RECORD = "vmm.json"
VMM_LOG = "logs/vmm.log"
# The host end of the guest agent's channel (a QEMU chardev, or Cloud Hypervisor's vsock).
VMM_AGENT_SOCKET = "agent.sock"
# An instance folder renamed so is a removal under way (a dot name is never read as an instance).
TOMBSTONE_PREFIX = ".deleting-"
# What a quarantined folder holds beside its contents: where it came from and why.
QUARANTINE_NOTE = "QUARANTINE.json"


@dataclass(frozen=True, slots=True)
class Paths:
    root: Path

    # -- system --------------------------------------------------------------
    @property
    def system(self) -> Path:
        return self.root / "system"

    @property
    def kernel_dir(self) -> Path:
        return self.system / "kernel"

    @property
    def initrd_dir(self) -> Path:
        return self.system / "initrd"

    # Guest artifacts (written by managers.guest): version is written last, so its presence
    # means the kernel is complete; tree/ is the unpacked package with lib/modules/<release>.
    @property
    def kernel_vmlinux(self) -> Path:
        return self.kernel_dir / "vmlinux"

    @property
    def kernel_bzimage(self) -> Path:
        return self.kernel_dir / "bzImage"

    @property
    def kernel_version(self) -> Path:
        return self.kernel_dir / "version"

    @property
    def kernel_tree(self) -> Path:
        return self.kernel_dir / "tree"

    @property
    def kernel_overrides(self) -> Path:
        """vmlinux files extracted from a KERNEL_PATH bzImage, named by its sha256."""
        return self.kernel_dir / "override"

    @property
    def initrd_image(self) -> Path:
        return self.initrd_dir / "initrd.img"

    @property
    def initrd_inputs_hash(self) -> Path:
        return self.initrd_dir / "inputs.sha256"

    @property
    def guest_build_lock(self) -> Path:
        return self.system / ".guest-build.lock"

    @property
    def oci_layout(self) -> Path:
        return self.system / "oci"

    @property
    def tmp(self) -> Path:
        return self.system / "tmp"

    @property
    def acceleration_cache(self) -> Path:
        """The KVM-or-TCG probe's answer (managers.hypervisors). A fact of the host and
        its current boot, so it lives in /run, which every boot starts empty, and is
        shared by every dataplane on the host."""
        return RUN_DIR / "acceleration.json"

    # -- images --------------------------------------------------------------
    @property
    def images(self) -> Path:
        return self.root / "images"

    def image_dir(self, digest: str) -> Path:
        return self.images / _digest_dir(digest)

    def image_metadata(self, digest: str) -> Path:
        return self.image_dir(digest) / "metadata.json"

    def image_disk(self, digest: str, fmt: str) -> Path:
        return self.image_dir(digest) / f"rootfs.{fmt}"

    @property
    def image_tags(self) -> Path:
        return self.images / "tags"

    # -- instances -----------------------------------------------------------
    @property
    def instances(self) -> Path:
        return self.root / "instances"

    def instance_dir(self, instance_id: str) -> Path:
        return self.instances / instance_id

    def instance_metadata(self, instance_id: str) -> Path:
        return self.instance_dir(instance_id) / "metadata.json"

    def instance_overlay(self, instance_id: str) -> Path:
        return self.instance_dir(instance_id) / "overlay.raw"

    def instance_config_disk(self, instance_id: str) -> Path:
        return self.instance_dir(instance_id) / "config.img"

    def instance_api_socket(self, instance_id: str) -> Path:
        return self.instance_dir(instance_id) / VMM_SOCKET

    def instance_logs(self, instance_id: str) -> Path:
        return self.instance_dir(instance_id) / "logs"

    def instance_serial_raw(self, instance_id: str) -> Path:
        """The guest's serial port as the VMM writes it: the kernel's console and the init's
        markers (the log pump reads it)."""
        return self.instance_logs(instance_id) / "serial.raw"

    def instance_output_raw(self, instance_id: str) -> Path:
        """The guest's output channel as the VMM writes it: the program's output."""
        return self.instance_logs(instance_id) / "output.raw"

    def instance_vmm_raw(self, instance_id: str) -> Path:
        """The VMM process's own stdout and stderr (written by ``managers.hypervisors``)."""
        return self.instance_dir(instance_id) / VMM_LOG

    def instance_pump_state(self, instance_id: str) -> Path:
        return self.instance_logs(instance_id) / "pump.json"

    def instance_guest_status(self, instance_id: str) -> Path:
        return self.instance_dir(instance_id) / "guest.json"

    def instance_standby(self, instance_id: str) -> Path:
        return self.instance_dir(instance_id) / "standby"

    def instance_standby_partial(self, instance_id: str) -> Path:
        """A standby snapshot being written; renamed to ``standby/`` once complete."""
        return self.instance_dir(instance_id) / "standby.partial"

    # -- volumes -------------------------------------------------------------
    @property
    def volumes(self) -> Path:
        return self.root / "volumes"

    def volume_dir(self, volume_id: str) -> Path:
        return self.volumes / volume_id

    def volume_metadata(self, volume_id: str) -> Path:
        return self.volume_dir(volume_id) / "metadata.json"

    def volume_data(self, volume_id: str) -> Path:
        return self.volume_dir(volume_id) / "data.raw"

    # -- ingresses -----------------------------------------------------------
    @property
    def ingresses(self) -> Path:
        return self.root / "ingresses"

    def ingress_dir(self, ingress_id: str) -> Path:
        return self.ingresses / ingress_id

    def ingress_metadata(self, ingress_id: str) -> Path:
        return self.ingress_dir(ingress_id) / "metadata.json"

    # -- quarantine ----------------------------------------------------------
    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    def quarantine_kind(self, kind: str) -> Path:
        """Where folders of one kind (``instances``, ``images``, ``volumes``) go when unreadable."""
        return self.quarantine / kind

    def ensure(self) -> None:
        """Create the top-level folders, ``DATA_DIR`` private to root; safe on every start."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        # A DATA_DIR made by an older version (or by hand) may be open to every user.
        os.chmod(self.root, 0o700)
        for folder in (
            self.kernel_dir,
            self.initrd_dir,
            self.oci_layout,
            self.tmp,
            self.images,
            self.image_tags,
            self.instances,
            self.volumes,
        ):
            folder.mkdir(parents=True, exist_ok=True)


def _digest_dir(digest: str) -> str:
    """``sha256:abc…`` -> ``abc…``: the folder name for a content digest."""
    algorithm, _, hexpart = digest.partition(":")
    if not hexpart:
        return algorithm
    if algorithm != "sha256":
        return f"{algorithm}-{hexpart}"
    return hexpart
