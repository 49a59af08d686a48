"""HTTP over the Cloud Hypervisor API socket, with v53's answers mapped to our errors.

v53 answers a wrong-state request with 500 (not the 405 its OpenAPI file lists), a missing VM
with 404, and puts its error chain in the body as a JSON array of strings; that chain is kept in
``VmmRequestFailed.vmm_errors`` (and ``details["vmm_errors"]``) so the operator sees Cloud
Hypervisor's own words.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from .errors import (
    HypervisorError,
    OperationTimeout,
    VmmProtocolError,
    VmmRequestFailed,
    WrongState,
)

# Actions whose only failure mode in v53 is the VM's state (or its absence).
STATE_ACTIONS = frozenset(
    {
        "vm.boot",
        "vm.pause",
        "vm.resume",
        "vm.shutdown",
        "vm.reboot",
        "vm.power-button",
        "vm.snapshot",
        "vm.restore",
        "vm.create",
        "vm.nmi",
    }
)


class ChClient:
    def __init__(
        self,
        instance_id: str,
        socket: Path,
        timeout: float,
        on_transport_error: Callable[[Exception], Awaitable[HypervisorError]],
    ) -> None:
        self.instance_id = instance_id
        self._on_transport_error = on_transport_error
        self._http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket)),
            base_url="http://localhost/api/v1/",
            timeout=timeout,
        )

    async def get(self, endpoint: str) -> Any:
        return await self._request("GET", endpoint, None)

    async def put(self, endpoint: str, body: dict[str, Any] | None = None) -> Any:
        """PUT an action. Bodiless actions must send no body at all: v53 answers 400 to one."""
        return await self._request("PUT", endpoint, body)

    async def _request(self, method: str, endpoint: str, body: dict[str, Any] | None) -> Any:
        try:
            if body is None:
                response = await self._http.request(method, endpoint)
            else:
                response = await self._http.request(method, endpoint, json=body)
        except httpx.TimeoutException as exc:
            raise OperationTimeout(
                self.instance_id, f"{method} {endpoint} got no answer in time"
            ) from exc
        except httpx.HTTPError as exc:
            raise await self._on_transport_error(exc) from exc
        if response.status_code in (200, 204):
            if not response.content:
                return None
            try:
                return response.json()
            except ValueError as exc:
                raise VmmProtocolError(
                    self.instance_id,
                    f"{endpoint} answered {response.status_code} with non-JSON "
                    f"{response.content[:120]!r}",
                ) from exc
        details = _error_chain(response)
        if details is None:
            raise VmmProtocolError(
                self.instance_id,
                f"{endpoint} answered {response.status_code} with an unexpected body "
                f"{response.content[:120]!r}",
            )
        error = (
            WrongState
            if response.status_code == 404
            or (response.status_code == 500 and endpoint in STATE_ACTIONS)
            else VmmRequestFailed
        )
        raise error(
            self.instance_id,
            f"Cloud Hypervisor refused {endpoint} ({response.status_code})",
            details,
            response.status_code,
        )

    async def aclose(self) -> None:
        await self._http.aclose()


def _error_chain(response: httpx.Response) -> list[str] | None:
    if response.status_code < 400 or response.status_code > 599:
        return None
    if not response.content:
        return []
    try:
        value = json.loads(response.content)
    except ValueError:
        return None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None
