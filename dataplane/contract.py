"""Contract validation: every request and every non-streaming response against ``openapi.yaml``.

openapi-core has no Litestar integration, so this module adapts ASGI messages to
its ``Request``/``Response`` protocols and runs as an ASGI middleware in front of
the router:

* a request the spec rejects is answered 400 in the ``Error`` shape and never
  reaches a handler;
* a response that breaks the spec is logged as a contract violation, counted in
  :attr:`ContractMiddleware.violations` (tests fail on any), and replaced by a 500;
* streamed responses (``text/event-stream``, file downloads) pass through unbuffered.

Two caches keep the cost per request well under a millisecond: the operation is
found by our own index (:mod:`dataplane.spec`) and openapi-core's path lookup is
memoized per operation; compiled JSON-schema validators are memoized per schema.
Each schema is also compiled by jsonschema-rs, which answers "valid" about two
hundred times faster than the pure-Python jsonschema openapi-core drives; only a
value it refuses goes through jsonschema, which stays the authority and writes
the error messages (see :class:`_FastSchemaValidator`).
Authentication is not checked here (see :mod:`dataplane.auth`), so openapi-core's
security step is skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qsl

import jsonschema_rs
import yaml
from jsonschema.exceptions import ValidationError as JsonSchemaError
from openapi_core import OpenAPI
from openapi_core.configurations import Config
from openapi_core.datatypes import RequestParameters
from openapi_core.deserializing.media_types.datatypes import MediaTypeDeserializersDict
from openapi_core.templating.paths.datatypes import PathOperationServer
from openapi_core.validation.request.validators import (
    V31RequestBodyValidator,
    V31RequestParametersValidator,
)
from openapi_core.validation.response.validators import V31ResponseValidator
from openapi_core.validation.schemas import oas31_schema_validators_factory
from openapi_core.validation.schemas.exceptions import InvalidSchemaValue
from openapi_core.validation.schemas.factories import SchemaValidatorsFactory
from openapi_core.validation.schemas.validators import SchemaValidator

from dataplane.asgi import ASGIApp, BodyTooLarge, Message, Receive, Scope, Send, drain, send_error
from dataplane.spec import STREAMED_MEDIA_TYPES, Match, Spec

log = logging.getLogger("dataplane.contract")

# JSON request bodies are small; binary uploads (archives) are streamed and never
# pass through here.
MAX_JSON_BODY = 4 * 1024 * 1024


class _MultiDict(dict[str, list[str]]):
    """The query-string mapping openapi-core expects: ``[]`` gives the first value."""

    def __getitem__(self, key: str) -> Any:
        return super().__getitem__(key)[0]

    def getlist(self, key: str) -> list[str]:
        return self.get(key) or []


class _HeaderDict(dict[str, str]):
    """Case-insensitive header lookup (keys are stored lower-cased)."""

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


@dataclass(slots=True)
class _Request:
    """openapi-core's ``Request`` protocol over an ASGI scope."""

    method: str
    path: str
    path_pattern: str
    parameters: RequestParameters
    content_type: str
    body: bytes | None
    host_url: str = "http://dataplane"


@dataclass(slots=True)
class _Response:
    status_code: int
    content_type: str
    headers: _HeaderDict
    data: bytes


class _FastSchemaValidator(SchemaValidator):
    """A schema validator that asks a compiled (Rust) validator first.

    jsonschema (the reference implementation openapi-core is built on) walks a
    20-instance list in about 3 ms; jsonschema-rs in about 20 µs. A value the fast
    one accepts is done. One it refuses goes through jsonschema, whose messages are
    kept. Where only jsonschema accepts, the refusal stands: the one difference is
    ``pattern``, which JSON Schema defines with ECMA-262 regexes, where ``$`` ends
    the string, while jsonschema uses Python's, where ``$`` also matches before a
    final newline (so ``"web\n"`` passed the name pattern). A value jsonschema-rs
    cannot read (not JSON) is left to jsonschema. ``tests/unit/test_contract_fast.py``
    checks the two agree on values generated from every schema of the spec.
    """

    def __init__(
        self, schema: Any, validator: Any, fast: jsonschema_rs.Validator | None = None
    ) -> None:
        super().__init__(schema, validator)
        self.fast = fast

    def validate(self, value: Any) -> None:
        if self.fast is None:
            super().validate(value)
            return
        try:
            if self.fast.is_valid(value):
                return
        except ValueError:
            super().validate(value)
            return
        super().validate(value)
        errors = [
            JsonSchemaError(error.message, path=error.instance_path)
            for error in self.fast.iter_errors(value)
        ]
        schema_type = (self.schema / "type").read_str_or_list("any")
        raise InvalidSchemaValue(value, schema_type, schema_errors=errors)


def compile_fast(document: dict[str, Any], schema: dict[str, Any]) -> jsonschema_rs.Validator:
    """jsonschema-rs for ``schema``, one of the OpenAPI ``document``'s schemas.

    The schema is laid over the document, so its ``$ref``s to components resolve
    as openapi-core resolves them; the document's own keys (``paths``, ``info``...)
    are unknown keywords there, which JSON Schema ignores.
    """
    return jsonschema_rs.Draft202012Validator({**document, **schema}, validate_formats=True)


class _MemoizedSchemaValidators(SchemaValidatorsFactory):
    """Compile each JSON schema once instead of on every request.

    openapi-core builds a fresh jsonschema validator (deep-copying its format
    checker) per call; the compiled validators are stateless, so one per schema
    location is enough.
    """

    def __init__(self, base: SchemaValidatorsFactory, document: dict[str, Any] | None) -> None:
        super().__init__(base.schema_validator_cls, base.format_checker)
        self._document = document
        self._memo: dict[tuple[Any, ...], SchemaValidator] = {}

    def create(
        self,
        spec: Any,
        schema: Any,
        format_validators: Any = None,
        extra_format_validators: Any = None,
        forbid_unspecified_additional_properties: bool = False,
        enforce_properties_required: bool = False,
    ) -> SchemaValidator:
        key = (
            tuple(schema.parts),
            forbid_unspecified_additional_properties,
            enforce_properties_required,
        )
        validator = self._memo.get(key)
        if validator is None:
            validator = super().create(
                spec,
                schema,
                format_validators,
                extra_format_validators,
                forbid_unspecified_additional_properties,
                enforce_properties_required,
            )
            # openapi-core's strict modes add keywords plain JSON Schema lacks.
            plain = not (
                forbid_unspecified_additional_properties
                or enforce_properties_required
                or format_validators
                or extra_format_validators
            )
            if plain and self._document is not None:
                with schema.resolve() as resolved:
                    fast = compile_fast(self._document, resolved.contents)
                validator = _FastSchemaValidator(validator.schema, validator.validator, fast)
            self._memo[key] = validator
        return validator


class _MemoizedPathMixin:
    """Look a path up once per operation: our index already knows which one it is."""

    _path_cache: dict[tuple[str, str], PathOperationServer]

    def _find_path(self, request: Any) -> PathOperationServer:
        cache: dict[tuple[str, str], PathOperationServer]
        cache = self.__dict__.setdefault("_path_cache", {})
        key = (request.method, request.path_pattern)
        found = cache.get(key)
        if found is None:
            found = cast(PathOperationServer, super()._find_path(request))  # type: ignore[misc]
            cache[key] = found
        return found


class _ParametersValidator(_MemoizedPathMixin, V31RequestParametersValidator):
    pass


class _BodyValidator(_MemoizedPathMixin, V31RequestBodyValidator):
    pass


class _ResponseValidator(_MemoizedPathMixin, V31ResponseValidator):
    pass


def _text(data: bytes) -> str:
    return data.decode("utf-8")


def _yaml(data: bytes) -> Any:
    return yaml.load(data, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


# openapi-core hands unknown media types to schemas as bytes; these are text
# (YAML is parsed, as clients generated from the spec and schemathesis do).
_TEXT_MEDIA_TYPES: MediaTypeDeserializersDict = {
    "application/yaml": _yaml,
    "text/css": _text,
    "text/javascript": _text,
    "text/event-stream": _text,
}


class Contract:
    """openapi-core validators for one spec. ``fast=False`` leaves every schema to
    jsonschema alone (the benchmark's baseline)."""

    def __init__(self, spec: Spec, *, fast: bool = True) -> None:
        self.spec = spec
        factory = _MemoizedSchemaValidators(
            oas31_schema_validators_factory, spec.document if fast else None
        )
        self._parameters = OpenAPI.from_dict(
            spec.document,
            config=Config(
                request_validator_cls=_ParametersValidator,
                response_validator_cls=_ResponseValidator,
                schema_validators_factory=factory,
                extra_media_type_deserializers=_TEXT_MEDIA_TYPES,
            ),
        )
        self._body = OpenAPI.from_dict(
            spec.document,
            config=Config(
                request_validator_cls=_BodyValidator,
                schema_validators_factory=factory,
                extra_media_type_deserializers=_TEXT_MEDIA_TYPES,
            ),
        )

    def request_errors(self, request: _Request, *, with_body: bool) -> list[dict[str, Any]]:
        errors: list[dict[str, Any]] = []
        for validator in (self._parameters, self._body) if with_body else (self._parameters,):
            errors.extend(_describe(validator.request_validator.iter_errors(request)))
        return errors

    def response_errors(self, request: _Request, response: _Response) -> list[dict[str, Any]]:
        return list(_describe(self._parameters.response_validator.iter_errors(request, response)))


def _describe(errors: Iterable[Exception]) -> Iterator[dict[str, Any]]:
    """Readable, JSON-safe descriptions of openapi-core errors.

    Some of its messages embed the offending value; ``str()`` of those can fail on
    bytes that are not UTF-8, so every conversion is guarded.
    """
    for error in errors:
        item: dict[str, Any] = {"error": type(error).__name__}
        name = getattr(error, "name", None)
        location = getattr(error, "location", None)
        if name:
            item["parameter"] = str(name)
        if location:
            item["in"] = str(location)
        schema_errors: list[str] = []
        cause: BaseException | None = error
        messages: list[str] = []
        while cause is not None:
            for schema_error in getattr(cause, "schema_errors", ()) or ():
                path = "/".join(str(p) for p in getattr(schema_error, "absolute_path", ()))
                text = _safe_str(getattr(schema_error, "message", schema_error))
                schema_errors.append(f"{path}: {text}" if path else text)
            if not getattr(cause, "schema_errors", None):
                messages.append(_safe_str(cause))
            cause = cause.__cause__
        item["message"] = "; ".join(m for m in messages if m)[:500] or type(error).__name__
        if schema_errors:
            item["schema_errors"] = schema_errors[:20]
        yield item


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:
        return type(value).__name__


def _mimetype(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


@dataclass
class ContractMiddleware:
    app: ASGIApp
    spec: Spec
    enabled: bool = True
    violations: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.contract = Contract(self.spec)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.enabled:
            await self.app(scope, receive, send)
            return
        raw_path = scope.get("raw_path") or scope["path"].encode()
        path = raw_path.decode("latin-1").split("?", 1)[0]
        match = self.spec.match(scope["method"], path)
        if match is None:
            allowed = self.spec.allowed_methods(path)
            if allowed is None:
                # Not a path of the contract. Answered here rather than by the router,
                # which would forgive a trailing or doubled slash and reach a handler
                # with a request nobody validated.
                await send_error(send, 404, "not_found", f"no route for {scope['method']} {path}")
                return
            # The spec, not the router, says which methods a path has (the router
            # would also offer OPTIONS and route by its own, looser templates).
            await send_error(
                send,
                405,
                "method_not_allowed",
                f"{scope['method']} is not allowed on {path}",
                {"allowed": allowed},
                headers={"Allow": ", ".join(allowed)},
            )
            return
        request = self._request(scope, match)
        if match.operation.streams_request_body:
            errors = self.contract.request_errors(request, with_body=False)
            media_type = _mimetype(request.content_type)
            if not media_type and "application/octet-stream" in match.operation.request_media_types:
                # RFC 9110 8.3: a body without a Content-Type may be taken as octet-stream
                # (what `curl -T` sends).
                media_type = "application/octet-stream"
            if media_type not in match.operation.request_media_types:
                accepted = ", ".join(match.operation.request_media_types)
                errors.append(
                    {
                        "error": "MediaTypeNotFound",
                        "message": f"Content-Type must be one of {accepted}, not {media_type!r}",
                    }
                )
        else:
            try:
                request.body = await drain(receive, MAX_JSON_BODY)
            except BodyTooLarge:
                await send_error(
                    send, 413, "payload_too_large", f"request body over {MAX_JSON_BODY} bytes"
                )
                return
            errors = self.contract.request_errors(request, with_body=True)
            receive = _replay(request.body, receive)
        if errors:
            await send_error(
                send,
                400,
                "invalid_request",
                "the request does not match the API contract: " + errors[0]["message"],
                {"errors": errors},
            )
            return
        await self.app(scope, receive, self._checking_send(send, request, match))

    def _request(self, scope: Scope, match: Match) -> _Request:
        query = _MultiDict()
        for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), True):
            query.setdefault(key, []).append(value)
        headers = _HeaderDict(
            (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers", ())
        )
        return _Request(
            method=scope["method"].lower(),
            path=match.operation.template,
            path_pattern=match.operation.template,
            parameters=RequestParameters(
                query=query, header=headers, cookie={}, path=match.path_params
            ),
            content_type=headers.get("content-type", ""),
            body=None,
        )

    def _checking_send(self, send: Send, request: _Request, match: Match) -> Send:
        start: Message | None = None
        chunks: list[bytes] = []
        streaming = False

        async def checking_send(message: Message) -> None:
            nonlocal start, streaming
            if streaming:
                await send(message)
                return
            if message["type"] == "http.response.start":
                start = message
                content_type = _response_header(message, b"content-type")
                if match.operation.streaming and _mimetype(content_type) in STREAMED_MEDIA_TYPES:
                    streaming = True
                    await send(message)
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            response = _Response(
                status_code=start["status"],
                content_type=_mimetype(_response_header(start, b"content-type")),
                headers=_HeaderDict(
                    (k.decode("latin-1").lower(), v.decode("latin-1"))
                    for k, v in start.get("headers", ())
                ),
                data=body,
            )
            errors = self.contract.response_errors(request, response)
            if errors:
                violation = {
                    "operation": match.operation.operation_id,
                    "status": response.status_code,
                    "errors": errors,
                }
                self.violations.append(violation)
                log.error("contract violation in a response", extra={"violation": violation})
                await send_error(
                    send,
                    500,
                    "contract_violation",
                    "the server produced a response that breaks its API contract",
                )
                return
            await send(start)
            await send({"type": "http.response.body", "body": body, "more_body": False})

        return checking_send


def _response_header(message: Message, name: bytes) -> str:
    for key, value in message.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return ""


def _replay(body: bytes, original: Receive) -> Receive:
    """Hand the already-read body to the app once; after that the client's own
    ``receive`` answers, which blocks until the client disconnects (streams rely
    on that to notice a client leaving)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await original()

    return receive
