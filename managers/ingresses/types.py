"""Value types of the ingresses subsystem: the request, the stored record, the target."""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from managers.ingresses.errors import IngressRecordInvalid, InvalidIngressSpec
from managers.network import Forward, Protocol

SCHEMA_VERSION = 1
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")
ID_RE = re.compile(r"^[0-9a-f]{12}$")
PORT_MAX = 65535
_FIELDS = frozenset(
    {"name", "instance_id", "host_port", "guest_port", "protocol", "listen_address"}
)


@dataclass(frozen=True, slots=True)
class Target:
    """Where an ingress leads: an instance that has a place on the node network."""

    instance_id: str
    address: IPv4Address | None  # None: the instance has networking turned off


@dataclass(frozen=True, slots=True)
class CreateIngress:
    """``POST /ingresses``'s body, parsed and checked on its own."""

    name: str
    instance: str  # id or name
    host_port: int
    guest_port: int
    protocol: Protocol = Protocol.TCP
    listen_address: IPv4Address | None = None

    @classmethod
    def from_json(cls, data: object) -> CreateIngress:
        """Parse the body on its own (the contract check may be off); raise
        :class:`InvalidIngressSpec` for anything the schema refuses."""
        if not isinstance(data, dict):
            raise InvalidIngressSpec("the body must be a JSON object")
        unknown = sorted(set(data) - _FIELDS)
        if unknown:
            raise InvalidIngressSpec(f"unknown field(s): {', '.join(unknown)}")
        missing = sorted(
            f for f in ("name", "instance_id", "host_port", "guest_port") if f not in data
        )
        if missing:
            raise InvalidIngressSpec(f"missing field(s): {', '.join(missing)}")
        name, instance = data["name"], data["instance_id"]
        if not isinstance(name, str) or not isinstance(instance, str) or not instance:
            raise InvalidIngressSpec("name and instance_id must be non-empty strings")
        ports: list[int] = []
        for field_name in ("host_port", "guest_port"):
            value = data[field_name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidIngressSpec(
                    f"{field_name} must be a whole number", {field_name: value}
                )
            ports.append(value)
        try:
            protocol = Protocol(data.get("protocol", "tcp"))
        except ValueError:
            raise InvalidIngressSpec(
                "protocol must be 'tcp' or 'udp'", {"protocol": data.get("protocol")}
            ) from None
        listen_text = data.get("listen_address")
        listen: IPv4Address | None = None
        if listen_text is not None and not isinstance(listen_text, str):
            raise InvalidIngressSpec('listen_address must be a string such as "127.0.0.1"')
        if listen_text is not None:
            try:
                listen = IPv4Address(listen_text)
            except ValueError:
                raise InvalidIngressSpec(
                    f"listen_address {listen_text!r} is not an IPv4 address",
                    {"listen_address": listen_text},
                ) from None
        request = cls(name, instance, ports[0], ports[1], protocol, listen)
        request.check()
        return request

    def check(self) -> None:
        """Raise :class:`InvalidIngressSpec` for anything the spec's schema would refuse."""
        if len(self.name) > 63 or not NAME_RE.fullmatch(self.name):
            raise InvalidIngressSpec(
                f"ingress name {self.name!r} must be 1-63 lowercase letters, digits, '.', '_' "
                "or '-', starting and ending with a letter or digit",
                {"name": self.name},
            )
        if ID_RE.fullmatch(self.name):
            raise InvalidIngressSpec(
                f"ingress name {self.name!r} would read as an ingress id (12 hex digits)",
                {"name": self.name},
            )
        for field_name, port in (("host_port", self.host_port), ("guest_port", self.guest_port)):
            if not 1 <= port <= PORT_MAX:
                raise InvalidIngressSpec(
                    f"{field_name} must be between 1 and {PORT_MAX}, got {port}",
                    {field_name: port},
                )
        listen = self.listen_address
        if listen is not None and (
            listen.is_multicast or listen.is_unspecified or listen == IPv4Address("255.255.255.255")
        ):
            raise InvalidIngressSpec(
                f"listen_address {listen} is not a unicast address; leave it out to listen on "
                "every address of the host",
                {"listen_address": str(listen)},
            )


@dataclass(frozen=True, slots=True)
class IngressRecord:
    """What ``ingresses/<id>/metadata.json`` holds; ``target`` is the instance's address when
    the ingress was made (kept up to date at start-up), so the table is rebuilt from records
    alone."""

    id: str
    name: str
    instance_id: str
    target: IPv4Address
    host_port: int
    guest_port: int
    protocol: Protocol
    listen_address: IPv4Address | None
    created_at: str

    def forward(self) -> Forward:
        return Forward(
            tag=self.id,
            protocol=self.protocol,
            listen=self.listen_address,
            host_port=self.host_port,
            target=self.target,
            guest_port=self.guest_port,
        )

    def overlaps(self, protocol: Protocol, listen: IPv4Address | None, host_port: int) -> bool:
        """Whether a forward of ``host_port`` on ``listen`` would take packets this one takes."""
        if (self.protocol, self.host_port) != (protocol, host_port):
            return False
        return self.listen_address is None or listen is None or self.listen_address == listen

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "id": self.id,
            "name": self.name,
            "instance_id": self.instance_id,
            "target": str(self.target),
            "host_port": self.host_port,
            "guest_port": self.guest_port,
            "protocol": self.protocol.value,
            "listen_address": str(self.listen_address) if self.listen_address else None,
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, data: object) -> IngressRecord:
        """Parse a stored record; anything malformed is an :class:`IngressRecordInvalid`."""
        if not isinstance(data, dict):
            raise IngressRecordInvalid("the record is not a JSON object")
        try:
            if data.get("schema") != SCHEMA_VERSION:
                raise IngressRecordInvalid(f"unknown ingress schema {data.get('schema')!r}")
            listen = data["listen_address"]
            record = cls(
                id=str(data["id"]),
                name=str(data["name"]),
                instance_id=str(data["instance_id"]),
                target=IPv4Address(data["target"]),
                host_port=_port(data["host_port"]),
                guest_port=_port(data["guest_port"]),
                protocol=Protocol(data["protocol"]),
                listen_address=IPv4Address(listen) if listen is not None else None,
                created_at=str(data["created_at"]),
            )
        except IngressRecordInvalid:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise IngressRecordInvalid(f"malformed ingress record: {error}") from error
        if not ID_RE.fullmatch(record.id) or not NAME_RE.fullmatch(record.name):
            raise IngressRecordInvalid(f"ingress record {record.id!r} has an unusable id or name")
        return record


def _port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= PORT_MAX:
        raise ValueError(f"{value!r} is not a port")
    return value
