"""The resources subsystem's errors."""

from __future__ import annotations

from managers.errors import DomainError
from managers.resources.types import RATIO_VARIABLES, ResourceKind

_UNITS = {ResourceKind.CPU: "vCPUs", ResourceKind.MEMORY: "bytes", ResourceKind.DISK: "bytes"}


class ResourceError(DomainError):
    code = "resource_error"


class InsufficientResources(ResourceError):
    """An operation would take a kind past its effective limit; nothing was done."""

    code = "insufficient_resources"

    def __init__(
        self,
        kind: ResourceKind,
        *,
        requested: int,
        allocated: int,
        effective_limit: int,
        oversub_ratio: float,
    ) -> None:
        available = max(0, effective_limit - allocated)
        short = requested - available
        unit = _UNITS[kind]
        super().__init__(
            f"not enough {kind.value}: this needs {requested} {unit} but {available} of the "
            f"effective limit of {effective_limit} are free ({short} short; the limit is the "
            f"host's capacity times {RATIO_VARIABLES[kind]}={oversub_ratio:g})",
            {
                "resource": kind.value,
                "requested": requested,
                "available": available,
                "allocated": allocated,
                "effective_limit": effective_limit,
                "short_by": short,
                "oversub_ratio": oversub_ratio,
            },
        )
