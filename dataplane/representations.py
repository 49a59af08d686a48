"""How resources read over the API: the bodies of ``GET``, shared by controllers and events."""

from __future__ import annotations

from typing import Any

from managers.images import Image
from managers.ingresses import IngressRecord
from managers.instances import Instance
from managers.volumes import Volume


def image_json(image: Image) -> dict[str, Any]:
    return {
        "name": image.name,
        "digest": image.digest,
        "status": str(image.status),
        "format": image.format,
        "progress": {
            "phase": image.progress.phase,
            "bytes_done": image.progress.bytes_done,
            "bytes_total": image.progress.bytes_total,
        },
        "error": image.error,
        "size": image.size,
        "config": image.config.to_dict() if image.config else None,
        "created_at": image.created_at,
        "updated_at": image.updated_at,
    }


def instance_json(instance: Instance) -> dict[str, Any]:
    """The contract's ``Instance``; a quarantined one has only its id, state and quarantine."""
    record = instance.record
    body: dict[str, Any] = {
        "id": instance.id,
        "name": instance.name,
        "state": str(instance.state),
        "program_started_at": instance.guest.program_started_at,
        "exit_code": instance.guest.exit_code,
        "error": instance.guest.error,
        "pid": instance.pid,
        "restarts": instance.restarts,
        "quarantine": None,
        "agent": {"ready": instance.agent.ready, "version": instance.agent.version},
    }
    quarantine = instance.quarantine
    if quarantine is not None:
        body["error"] = f"its record could not be read: {quarantine.reason}"
        body["quarantine"] = {
            "path": quarantine.path,
            "reason": quarantine.reason,
            "quarantined_at": quarantine.quarantined_at,
        }
    if record is None:
        return {**body, **dict.fromkeys(_RECORD_FIELDS)}
    network = record.network
    return {
        **body,
        "image": record.image.name,
        "image_digest": record.image.digest,
        **record.machine_json(),
        "network": {
            "enabled": network.enabled,
            "ip": network.address,
            "mac": network.mac,
            "gateway": network.gateway,
            "bandwidth": network.bandwidth.to_json(),
        },
        "created_at": record.created_at,
    }


# What only a readable record can tell; null for a quarantined instance.
_RECORD_FIELDS = (
    "image",
    "image_digest",
    "hypervisor",
    "vcpus",
    "memory_mb",
    "memory_max_mb",
    "overlay_size_mb",
    "env",
    "entrypoint",
    "cmd",
    "workdir",
    "network",
    "created_at",
    "restart_policy",
    "keep_on_exit",
    "volumes",
)


def volume_json(volume: Volume) -> dict[str, Any]:
    """The contract's ``Volume``."""
    record = volume.record
    return {
        "id": record.id,
        "name": record.name,
        "size_mb": record.size_mb,
        "format": record.format,
        "source": record.source.to_json(),
        "attachments": [
            {
                "instance_id": use.instance_id,
                "mount_path": use.mount_path,
                "readonly": use.readonly,
            }
            for use in volume.attachments
        ],
        "created_at": record.created_at,
    }


def ingress_json(ingress: IngressRecord) -> dict[str, Any]:
    """The contract's ``Ingress``."""
    return {
        "id": ingress.id,
        "name": ingress.name,
        "instance_id": ingress.instance_id,
        "protocol": ingress.protocol.value,
        "listen_address": str(ingress.listen_address) if ingress.listen_address else None,
        "host_port": ingress.host_port,
        "guest_address": str(ingress.target),
        "guest_port": ingress.guest_port,
        "created_at": ingress.created_at,
    }
