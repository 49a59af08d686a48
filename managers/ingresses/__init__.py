"""Ingresses: host ports forwarded into instances by DNAT in the network's nftables table."""

from managers.ingresses.errors import (
    IngressError,
    IngressExists,
    IngressNotFound,
    IngressRecordInvalid,
    InstanceWithoutNetwork,
    InvalidIngressSpec,
    PortInUse,
    PrivilegedPort,
    TargetNotFound,
)
from managers.ingresses.manager import ForwardingPort, IngressManager, TargetLookup
from managers.ingresses.types import CreateIngress, IngressRecord, Target

__all__ = [
    "CreateIngress",
    "ForwardingPort",
    "IngressError",
    "IngressExists",
    "IngressManager",
    "IngressNotFound",
    "IngressRecord",
    "IngressRecordInvalid",
    "InstanceWithoutNetwork",
    "InvalidIngressSpec",
    "PortInUse",
    "PrivilegedPort",
    "Target",
    "TargetLookup",
    "TargetNotFound",
]
