"""Bearer authentication: a static token (``AUTH_TOKEN``) and/or HS256 JWTs (``JWT_SECRET``).

Runs before contract validation so an unauthenticated caller learns nothing about
the API beyond 401. Operations the spec marks ``security: []`` (health, probes,
spec, docs) stay open; everything else, including unknown routes, needs a token.
"""

from __future__ import annotations

import hmac
import logging
import math
from dataclasses import dataclass
from typing import Any

import jwt

from dataplane.asgi import ASGIApp, Receive, Scope, Send, header, refuse_websocket, send_error
from dataplane.spec import Spec

log = logging.getLogger("dataplane.auth")

_CHALLENGE = 'Bearer realm="dataplane"'

# RFC 7519 NumericDate claims. PyJWT checks them with int(), which takes a numeric
# string ("9999999999") or a boolean, so their JSON types are checked here as well.
_NUMERIC_DATE_CLAIMS = ("exp", "nbf", "iat")


class _Rejected(Exception):
    pass


@dataclass
class AuthMiddleware:
    app: ASGIApp
    spec: Spec
    token: str | None
    jwt_secret: str | None
    # Operation ids open without a token on top of those the spec marks open (METRICS_PUBLIC).
    public: frozenset[str] = frozenset()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or not (self.token or self.jwt_secret):
            await self.app(scope, receive, send)
            return
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        # A WebSocket handshake is a GET.
        method = scope["method"] if kind == "http" else "GET"
        match = self.spec.match(method, raw_path.split("?", 1)[0])
        if match is not None and (
            match.operation.open or match.operation.operation_id in self.public
        ):
            await self.app(scope, receive, send)
            return
        try:
            self._check(header(scope, b"authorization"))
        except _Rejected as rejected:
            challenge = {"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'}
            if kind == "http":
                await send_error(send, 401, "unauthorized", str(rejected), headers=challenge)
            else:
                await refuse_websocket(
                    scope, send, 401, "unauthorized", str(rejected), headers=challenge
                )
            return
        await self.app(scope, receive, send)

    def _check(self, authorization: str | None) -> None:
        if not authorization:
            raise _Rejected("missing bearer token: send 'Authorization: Bearer <token>'")
        scheme, _, credentials = authorization.partition(" ")
        credentials = credentials.strip()
        if scheme.lower() != "bearer" or not credentials:
            raise _Rejected("the Authorization header must be 'Bearer <token>'")
        if self.token and hmac.compare_digest(credentials.encode(), self.token.encode()):
            return
        if self.jwt_secret and credentials.count(".") == 2:
            try:
                claims = jwt.decode(
                    credentials,
                    self.jwt_secret,
                    algorithms=["HS256"],
                    options={"require": ["exp"]},
                )
            except jwt.ExpiredSignatureError:
                raise _Rejected("the token has expired") from None
            except jwt.MissingRequiredClaimError:
                raise _Rejected("the token has no 'exp' claim") from None
            except jwt.InvalidTokenError as error:
                log.info("rejected a JWT: %s", error)
                raise _Rejected("invalid token") from None
            _check_numeric_dates(claims)
            return
        raise _Rejected("invalid token")


def _check_numeric_dates(claims: dict[str, Any]) -> None:
    for name in _NUMERIC_DATE_CLAIMS:
        if name in claims and not _is_numeric_date(claims[name]):
            log.info("rejected a JWT: its %r claim is a %s", name, type(claims[name]).__name__)
            raise _Rejected(f"the token's '{name}' claim must be a number (a NumericDate)")


def _is_numeric_date(value: object) -> bool:
    # bool is an int subclass; a float may be fractional (RFC 7519 allows it) but
    # not infinite or NaN, which Python's JSON parser lets through.
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
