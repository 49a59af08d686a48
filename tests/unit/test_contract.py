"""ContractMiddleware against a small spec and a tiny ASGI app, in-process."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from dataplane.asgi import Message, Receive, Scope, Send, drain
from dataplane.contract import ContractMiddleware
from dataplane.spec import Spec

SPEC = b"""
openapi: 3.1.0
info: {title: t, version: '1'}
servers: [{url: /}]
paths:
  /things:
    post:
      operationId: createThing
      requestBody:
        required: true
        content:
          application/json:
            schema:
              type: object
              required: [name]
              additionalProperties: false
              properties:
                name: {type: string, minLength: 1}
                size: {type: integer, minimum: 1}
      responses:
        '201':
          description: made
          content:
            application/json:
              schema:
                type: object
                required: [id]
                properties: {id: {type: string}}
  /things/{id}:
    get:
      operationId: getThing
      parameters:
        - {name: id, in: path, required: true, schema: {type: string, pattern: '^[a-z]+$'}}
        - {name: tail, in: query, schema: {type: integer, minimum: 0}}
      responses:
        '200':
          description: ok
          content:
            application/json:
              schema: {type: object, required: [id], properties: {id: {type: string}}}
  /things/{id}/events:
    get:
      operationId: thingEvents
      parameters:
        - {name: id, in: path, required: true, schema: {type: string}}
      responses:
        '200':
          description: stream
          content:
            text/event-stream:
              schema: {type: string}
"""


class App:
    """Echoes what it got; answers with whatever body the test sets."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.reply: Any = {"id": "abc"}
        self.status = 200
        self.content_type = "application/json"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await drain(receive, 1 << 20)
        self.calls.append({"path": scope["path"], "body": body})
        payload = self.reply if isinstance(self.reply, bytes) else json.dumps(self.reply).encode()
        start: Message = {
            "type": "http.response.start",
            "status": self.status,
            "headers": [(b"content-type", self.content_type.encode())],
        }
        await send(start)
        await send({"type": "http.response.body", "body": payload})


@pytest.fixture
def app() -> App:
    return App()


@pytest.fixture
def middleware(app: App) -> ContractMiddleware:
    return ContractMiddleware(app, Spec(SPEC))


async def call(mw: ContractMiddleware, method: str, path: str, **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=mw)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.request(method, path, **kwargs)


@pytest.mark.anyio
async def test_valid_request_reaches_the_app_with_its_body(
    middleware: ContractMiddleware, app: App
) -> None:
    app.status = 201
    response = await call(middleware, "POST", "/things", json={"name": "x", "size": 2})
    assert response.status_code == 201
    assert json.loads(app.calls[0]["body"]) == {"name": "x", "size": 2}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, ""),
        ({"json": {"size": 2}}, "name"),
        ({"json": {"name": "x", "size": 0}}, "size"),
        ({"json": {"name": "x", "extra": True}}, "extra"),
        ({"json": ["not", "an", "object"]}, ""),
        ({"content": b"\xff\xfe\x00garbage", "headers": {"content-type": "application/json"}}, ""),
        ({"content": b"name=x", "headers": {"content-type": "text/plain"}}, ""),
        ({}, ""),
    ],
)
async def test_invalid_bodies_are_400_and_never_reach_the_app(
    middleware: ContractMiddleware, app: App, kwargs: dict[str, Any], needle: str
) -> None:
    response = await call(middleware, "POST", "/things", **kwargs)
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid_request"
    assert body["details"]["errors"]
    assert needle in json.dumps(body)
    assert app.calls == []


@pytest.mark.anyio
async def test_invalid_parameters_are_400(middleware: ContractMiddleware, app: App) -> None:
    assert (await call(middleware, "GET", "/things/ABC")).status_code == 400
    assert (await call(middleware, "GET", "/things/abc?tail=-1")).status_code == 400
    assert (await call(middleware, "GET", "/things/abc?tail=many")).status_code == 400
    assert app.calls == []
    assert (await call(middleware, "GET", "/things/abc?tail=3")).status_code == 200


@pytest.mark.anyio
async def test_a_response_that_breaks_the_contract_becomes_500_and_is_recorded(
    middleware: ContractMiddleware, app: App
) -> None:
    app.reply = {"no_id": True}
    response = await call(middleware, "GET", "/things/abc")
    assert response.status_code == 500
    assert response.json()["code"] == "contract_violation"
    assert middleware.violations[0]["operation"] == "getThing"


@pytest.mark.anyio
async def test_an_undocumented_status_is_a_violation(
    middleware: ContractMiddleware, app: App
) -> None:
    app.status = 418
    assert (await call(middleware, "GET", "/things/abc")).status_code == 500
    assert len(middleware.violations) == 1


@pytest.mark.anyio
async def test_event_streams_pass_through_unbuffered(
    middleware: ContractMiddleware, app: App
) -> None:
    app.content_type = "text/event-stream"
    app.reply = b"data: anything at all\n\n"
    response = await call(middleware, "GET", "/things/abc/events")
    assert response.status_code == 200
    assert response.content == b"data: anything at all\n\n"
    assert middleware.violations == []


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/elsewhere", "/things/", "//things", "/things/abc/"])
async def test_paths_outside_the_contract_are_404_and_never_reach_the_app(
    middleware: ContractMiddleware, app: App, path: str
) -> None:
    response = await call(middleware, "POST" if path.startswith("/things") else "GET", path)
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
    assert app.calls == []


@pytest.mark.anyio
async def test_oversized_json_body_is_413(middleware: ContractMiddleware, app: App) -> None:
    big = b'{"name": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    response = await call(
        middleware, "POST", "/things", content=big, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"
    assert app.calls == []
