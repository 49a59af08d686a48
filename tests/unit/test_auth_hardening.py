"""JWT time claims must be JSON numbers: PyJWT alone takes ``"exp": "9999999999"``.

Real HS256 tokens made by PyJWT go through :class:`AuthMiddleware` in front of a
stand-in app, as a request for a protected operation would.
"""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import jwt
import pytest

from dataplane.asgi import Message, Scope
from dataplane.auth import AuthMiddleware
from dataplane.spec import Spec

SECRET = "jwt-secret-for-auth-hardening-tests-0123456789"
PROTECTED = "/instances"
SPEC = Spec.load()


def later() -> int:
    return int(time.time()) + 300


def earlier() -> int:
    return int(time.time()) - 300


def sign(claims: dict[str, Any]) -> str:
    return jwt.encode({"sub": "tester", **claims}, SECRET, algorithm="HS256")


def sign_raw(payload: str) -> str:
    """A token over a payload written by hand, for JSON that ``json.dumps`` never writes."""
    return jwt.PyJWS().encode(payload.encode(), SECRET, algorithm="HS256")


def call(bearer: str) -> tuple[int, dict[bytes, bytes], dict[str, Any] | None]:
    """(status, headers, JSON body or None when the stand-in app answered)."""
    reached: list[bool] = []
    sent: list[Message] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        reached.append(True)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    middleware = AuthMiddleware(app, SPEC, token=None, jwt_secret=SECRET)
    scope: Scope = {
        "type": "http",
        "method": "GET",
        "path": PROTECTED,
        "raw_path": PROTECTED.encode(),
        "query_string": b"",
        "headers": [(b"authorization", f"Bearer {bearer}".encode())],
    }
    anyio.run(middleware, scope, receive, send)
    status = sent[0]["status"]
    headers = dict(sent[0]["headers"])
    if reached:
        return status, headers, None
    return status, headers, json.loads(sent[1]["body"])


def assert_refused(bearer: str, message_part: str | None = None) -> None:
    status, headers, body = call(bearer)
    assert status == 401
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"www-authenticate"].startswith(b'Bearer realm="dataplane"')
    assert body is not None
    assert body["code"] == "unauthorized"
    if message_part is not None:
        assert message_part in body["message"]


def assert_accepted(bearer: str) -> None:
    assert call(bearer) == (200, {}, None)


def test_pyjwt_alone_accepts_a_numeric_string_exp() -> None:
    # The hole this module closes: PyJWT converts `exp` with int().
    token = sign({"exp": "9999999999"})
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"require": ["exp"]})
    assert claims["exp"] == "9999999999"


@pytest.mark.parametrize(
    "exp",
    ["9999999999", "tomorrow", "", True, False, [9999999999], {"at": 9999999999}],
    ids=repr,
)
def test_an_exp_that_is_not_a_number_is_refused(exp: object) -> None:
    assert_refused(sign({"exp": exp}))


def test_a_numeric_string_exp_is_refused_with_a_reason() -> None:
    assert_refused(sign({"exp": "9999999999"}), "'exp' claim must be a number")


@pytest.mark.parametrize("claim", ["nbf", "iat"])
@pytest.mark.parametrize("value", ["0", "1700000000", "yesterday", True, False], ids=repr)
def test_nbf_and_iat_that_are_not_numbers_are_refused(claim: str, value: object) -> None:
    assert_refused(sign({"exp": later(), claim: value}))


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_refused(claim: str, literal: str) -> None:
    # Python's JSON parser reads these (1e400 overflows to inf); no NumericDate is one.
    others = {"exp": later()} if claim != "exp" else {}
    fields = [f'"{name}": {value}' for name, value in others.items()]
    token = sign_raw("{" + ", ".join([*fields, f'"{claim}": {literal}']) + "}")
    assert_refused(token)


def test_a_null_exp_counts_as_missing() -> None:
    assert_refused(sign({"exp": None}), "no 'exp' claim")


def test_a_missing_exp_is_refused() -> None:
    assert_refused(sign({}), "no 'exp' claim")


def test_an_expired_numeric_exp_is_refused() -> None:
    assert_refused(sign({"exp": earlier()}), "expired")


def test_integer_time_claims_pass() -> None:
    assert_accepted(sign({"exp": later(), "nbf": earlier(), "iat": earlier()}))


def test_fractional_time_claims_pass() -> None:
    # RFC 7519 section 2: a NumericDate may be a non-integer JSON number.
    assert_accepted(sign({"exp": later() + 0.5, "nbf": earlier() + 0.25, "iat": earlier() + 0.75}))


def test_a_number_written_with_an_exponent_passes() -> None:
    assert_accepted(sign_raw(f'{{"exp": 9.9e9, "iat": {earlier()}}}'))


def test_a_float_exp_in_the_past_is_refused() -> None:
    assert_refused(sign({"exp": earlier() + 0.5}), "expired")
