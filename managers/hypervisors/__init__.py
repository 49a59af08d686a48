"""Hypervisor backends behind one async interface (see README.md)."""

from __future__ import annotations

from .agent_socket import agent_transport, output_transport
from .base import HypervisorBackend, Vmm
from .errors import (
    HypervisorError,
    InvalidRequest,
    OperationTimeout,
    UnsupportedVersion,
    VmmDied,
    VmmNotFound,
    VmmProtocolError,
    VmmRequestFailed,
    VmmStartTimeout,
    WrongState,
)
from .factory import open_backend
from .process import terminate_recorded, vmm_pids
from .types import (
    Acceleration,
    BackendKind,
    BackendSettings,
    DiskSpec,
    MemoryRestoreMode,
    NetSpec,
    SpecChanges,
    VmmInfo,
    VmSpec,
    VmState,
)

__all__ = [
    "Acceleration",
    "BackendKind",
    "BackendSettings",
    "DiskSpec",
    "HypervisorBackend",
    "HypervisorError",
    "InvalidRequest",
    "MemoryRestoreMode",
    "NetSpec",
    "OperationTimeout",
    "SpecChanges",
    "UnsupportedVersion",
    "VmSpec",
    "VmState",
    "Vmm",
    "VmmDied",
    "VmmInfo",
    "VmmNotFound",
    "VmmProtocolError",
    "VmmRequestFailed",
    "VmmStartTimeout",
    "WrongState",
    "agent_transport",
    "open_backend",
    "output_transport",
    "terminate_recorded",
    "vmm_pids",
]
