"""The ingresses error tree.

Each class's ``code`` is the API's error code; a class without one answers with its parent's::

    IngressError                 ingress_error
    ├── InvalidIngressSpec       invalid_ingress           the request cannot describe an ingress
    ├── IngressNotFound          ingress_not_found         no ingress has that id or name
    ├── TargetNotFound           instance_not_found        no instance has that id or name
    ├── IngressExists            ingress_exists            the name is taken
    ├── PortInUse                port_in_use               another ingress or a host socket has it
    ├── PrivilegedPort           port_privileged           below the unprivileged range, and the
    │                                                      service lacks CAP_NET_BIND_SERVICE
    ├── InstanceWithoutNetwork   instance_without_network  the instance has no network (or the
    │                                                      node has none)
    └── IngressRecordInvalid                               a stored record does not parse
"""

from __future__ import annotations

from managers.errors import DomainError


class IngressError(DomainError):
    """Base of every error raised by ``managers.ingresses``."""

    code = "ingress_error"


class InvalidIngressSpec(IngressError):
    code = "invalid_ingress"


class IngressNotFound(IngressError):
    code = "ingress_not_found"

    def __init__(self, key: str) -> None:
        super().__init__(f"no ingress with id or name {key!r}", {"ingress": key})


class TargetNotFound(IngressError):
    code = "instance_not_found"

    def __init__(self, key: str) -> None:
        super().__init__(f"no instance with id or name {key!r}", {"instance": key})


class IngressExists(IngressError):
    code = "ingress_exists"

    def __init__(self, name: str) -> None:
        super().__init__(f"an ingress named {name!r} already exists", {"name": name})


class PortInUse(IngressError):
    code = "port_in_use"


class PrivilegedPort(IngressError):
    code = "port_privileged"


class InstanceWithoutNetwork(IngressError):
    code = "instance_without_network"


class IngressRecordInvalid(IngressError):
    """A stored record that does not parse (its folder goes to quarantine)."""
