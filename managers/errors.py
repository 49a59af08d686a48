"""The one base of every error the managers raise on purpose: :class:`DomainError`.

Each package roots its own tree in a subclass (``ImageError``, ``InstanceError``,
``NetworkError``, ``HypervisorError``, ``GuestError``). The domain knows nothing of HTTP: the
edge reads ``code``, ``message`` and ``details`` and picks the status itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar


class DomainError(Exception):
    """An error raised on purpose: a stable ``code``, a human ``message`` and ``details``."""

    # Clients match on this, so a subclass overrides it only to name a kind they can act on.
    code: ClassVar[str] = "domain_error"

    def __init__(self, message: str, details: Mapping[str, object] | None = None) -> None:
        super().__init__(message)
        self.message = message
        # A copy, so a caller that keeps building its dict cannot change an error already raised.
        self.details: dict[str, object] = dict(details or {})
