"""Every error leaves the server in one shape: ``{"code", "message", "details"?}``.

:class:`ApiError` is what handlers raise. The exception handlers here turn it,
Litestar's own HTTP exceptions (unknown route, wrong method, bad parameters) and
anything unexpected into that shape. Domain errors from ``managers`` (every one a
:class:`~managers.errors.DomainError`) bring their own ``code``, ``message`` and ``details``; their
HTTP status comes from one table, :data:`DOMAIN_ERRORS`, and nowhere else.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException

from managers.agent import errors as agent_errors
from managers.errors import DomainError
from managers.guest import errors as guest_errors
from managers.hypervisors import errors as hypervisor_errors
from managers.images import errors as images_errors
from managers.ingresses import errors as ingresses_errors
from managers.instances import errors as instances_errors
from managers.network import errors as network_errors
from managers.resources import errors as resources_errors
from managers.volumes import errors as volumes_errors

log = logging.getLogger("dataplane.errors")

JSON = "application/json"


class ApiError(Exception):
    """An error with an HTTP status, a stable code and a human message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return json.dumps(body, ensure_ascii=False, default=str).encode()


def error_response(error: ApiError) -> Response[bytes]:
    return Response(
        content=error_body(error.code, error.message, error.details),
        status_code=error.status,
        media_type=JSON,
        headers=error.headers,
    )


# Domain error type -> HTTP status: the one place where the domain meets HTTP. The code comes
# from the error itself; the status from the most specific class listed here, because lookups
# walk the exception's MRO (``DomainError`` last, so every domain error has one).
DOMAIN_ERRORS: dict[type[DomainError], int] = {
    resources_errors.ResourceError: 500,
    resources_errors.InsufficientResources: 409,
    images_errors.BuildFailed: 500,
    images_errors.ImageTooLarge: 413,
    images_errors.StorageFull: 507,
    images_errors.DigestMismatch: 500,
    images_errors.InvalidReference: 400,
    images_errors.InvalidArchive: 400,
    images_errors.InvalidFormat: 400,
    images_errors.UnsupportedImage: 400,
    images_errors.ImageNotFound: 404,
    images_errors.ImageInUse: 409,
    images_errors.FormatConflict: 409,
    images_errors.ImageNotReady: 409,
    images_errors.RegistryUnreachable: 502,
    images_errors.RegistryError: 502,
    images_errors.ImageError: 500,
    instances_errors.InvalidInstanceSpec: 400,
    instances_errors.InstanceNotFound: 404,
    instances_errors.ImageMissing: 404,
    instances_errors.ImageUnusable: 409,
    instances_errors.InstanceExists: 409,
    instances_errors.WrongInstanceState: 409,
    instances_errors.InstanceQuarantined: 409,
    instances_errors.VolumeNotAttached: 404,
    instances_errors.ActionFailed: 500,
    instances_errors.InstanceError: 500,
    guest_errors.GuestError: 503,
    hypervisor_errors.HypervisorError: 500,
    agent_errors.ExecFailed: 400,
    agent_errors.InvalidGuestPath: 400,
    agent_errors.GuestPermissionDenied: 403,
    agent_errors.GuestPathNotFound: 404,
    agent_errors.AgentDisconnected: 409,
    agent_errors.GuestStorageFull: 507,
    agent_errors.GuestOperationFailed: 502,
    agent_errors.AgentProtocolError: 502,
    agent_errors.AgentUnavailable: 503,
    agent_errors.AgentError: 500,
    volumes_errors.InvalidVolumeSpec: 400,
    volumes_errors.InvalidVolumeArchive: 400,
    volumes_errors.VolumeTooSmall: 400,
    volumes_errors.VolumeNotFound: 404,
    volumes_errors.SourceImageMissing: 404,
    volumes_errors.SourceImageNotReady: 409,
    volumes_errors.VolumeExists: 409,
    volumes_errors.VolumeInUse: 409,
    volumes_errors.VolumeBusy: 409,
    volumes_errors.VolumeQuarantined: 409,
    volumes_errors.InsufficientStorage: 507,
    volumes_errors.VolumeBuildFailed: 500,
    volumes_errors.VolumeError: 500,
    ingresses_errors.InvalidIngressSpec: 400,
    ingresses_errors.PrivilegedPort: 403,
    ingresses_errors.IngressNotFound: 404,
    ingresses_errors.TargetNotFound: 404,
    ingresses_errors.IngressExists: 409,
    ingresses_errors.PortInUse: 409,
    ingresses_errors.InstanceWithoutNetwork: 409,
    ingresses_errors.IngressError: 500,
    network_errors.AddressExhausted: 409,
    network_errors.NetworkError: 500,
    DomainError: 500,
}


def domain_status(error: DomainError) -> int:
    """The HTTP status of a domain error: its most specific class in :data:`DOMAIN_ERRORS`."""
    for cls in type(error).__mro__:
        status = DOMAIN_ERRORS.get(cls)
        if status is not None:
            return status
    return 500


_STATUS_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    502: "bad_gateway",
    503: "unavailable",
}


def _code_for_status(status: int) -> str:
    return _STATUS_CODES.get(status, "internal_error" if status >= 500 else "client_error")


def handle_api_error(_: Request[Any, Any, Any], exc: ApiError) -> Response[bytes]:
    return error_response(exc)


def handle_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    """Litestar's own answers (404, 405, 400 for bad parameters) in our shape."""
    status = exc.status_code
    if status == 404:
        message = f"no route for {request.method} {request.url.path}"
    elif status == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = _plain(exc.detail) or "request failed"
    details: dict[str, Any] | None = None
    extra = getattr(exc, "extra", None)
    if extra:
        details = {"errors": extra if isinstance(extra, list) else [extra]}
    headers = dict(exc.headers or {})
    return error_response(ApiError(status, _code_for_status(status), message, details, headers))


def handle_domain_error(request: Request[Any, Any, Any], exc: DomainError) -> Response[bytes]:
    status = domain_status(exc)
    if status >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc)
    return error_response(ApiError(status, exc.code, exc.message, exc.details))


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.exception("unhandled error serving %s %s", request.method, request.url.path)
    return error_response(ApiError(500, "internal_error", "internal server error"))


def _plain(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


EXCEPTION_HANDLERS: dict[type[Exception] | int, Any] = {
    ApiError: handle_api_error,
    HTTPException: handle_http_exception,
    DomainError: handle_domain_error,
    Exception: handle_unexpected,
}
