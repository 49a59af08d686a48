"""The contract document: its bytes, its JSON form, and an index of its operations.

The index maps a request (method, concrete path) to the spec operation it hits,
with the path parameters pulled out. Auth uses it to know which operations are
open (``security: []``); contract validation uses it so openapi-core never has to
search the whole document for a path on every request.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import unquote

import yaml

_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


@dataclass(frozen=True, slots=True)
class Operation:
    method: str
    template: str
    operation_id: str
    open: bool
    streaming: bool
    streams_request_body: bool
    request_media_types: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Match:
    operation: Operation
    path_params: dict[str, str]


class _Route:
    __slots__ = ("operations", "params", "regex", "template")

    def __init__(self, template: str) -> None:
        self.template = template
        self.params: list[str] = re.findall(r"{([^}/]+)}", template)
        pattern = "".join(
            f"(?P<p{index}>[^/]+)" if part.startswith("{") else re.escape(part)
            for index, part in _split_template(template)
        )
        self.regex = re.compile(f"^{pattern}$")
        self.operations: dict[str, Operation] = {}


def _split_template(template: str) -> list[tuple[int, str]]:
    parts: list[tuple[int, str]] = []
    index = 0
    for piece in re.split(r"({[^}/]+})", template):
        if not piece:
            continue
        if piece.startswith("{"):
            parts.append((index, piece))
            index += 1
        else:
            parts.append((-1, piece))
    return parts


class Spec:
    """The loaded ``openapi.yaml``."""

    def __init__(self, raw: bytes) -> None:
        self.raw_yaml = raw
        self.document: dict[str, Any] = yaml.safe_load(raw)
        self.raw_json = json.dumps(self.document, ensure_ascii=False).encode()
        self.version: str = self.document["info"]["version"]
        global_security = self.document.get("security", [])
        self._literal: dict[str, _Route] = {}
        self._templated: list[_Route] = []
        for template, item in self.document.get("paths", {}).items():
            route = _Route(template)
            for method in _METHODS:
                op = item.get(method)
                if op is None:
                    continue
                security = op.get("security", global_security)
                route.operations[method.upper()] = Operation(
                    method=method.upper(),
                    template=template,
                    operation_id=op.get("operationId", f"{method} {template}"),
                    open=security == [] or {} in security,
                    streaming=_is_streaming(op),
                    streams_request_body=_streams_request_body(op),
                    request_media_types=tuple(
                        ((op.get("requestBody") or {}).get("content") or {}).keys()
                    ),
                )
            if route.params:
                self._templated.append(route)
            else:
                self._literal[template] = route
        # A literal segment beats a parameter where two templates overlap
        # (``/images/import`` before ``/images/{name}``), as routers do.
        self._templated.sort(key=lambda r: (len(r.params), -len(r.template)))

    @classmethod
    def load(cls) -> Spec:
        return cls(resources.files("dataplane").joinpath("openapi.yaml").read_bytes())

    def match(self, method: str, raw_path: str) -> Match | None:
        """The operation a request hits, matching the raw (still percent-encoded) path.

        Matching the raw path lets a parameter carry an encoded ``/``, as an image
        reference like ``docker.io%2Flibrary%2Falpine`` does; parameters come back
        decoded. Where templates overlap, the most literal one is the path
        (``/images/import`` over ``/images/{name}``), whatever the method: a method
        it lacks is a 405, as for any other path.
        """
        found = self._route(raw_path)
        if found is None:
            return None
        route, params = found
        operation = route.operations.get(method)
        return Match(operation, params) if operation is not None else None

    def template_of(self, raw_path: str) -> str | None:
        """The spec's path template a raw path falls under (``/instances/{id}``), or None."""
        found = self._route(raw_path)
        return found[0].template if found is not None else None

    def allowed_methods(self, raw_path: str) -> list[str] | None:
        """The methods the spec has for this path, or None for a path it does not know."""
        found = self._route(raw_path)
        return sorted(found[0].operations) if found is not None else None

    def _route(self, raw_path: str) -> tuple[_Route, dict[str, str]] | None:
        route = self._literal.get(raw_path)
        if route is not None:
            return route, {}
        for candidate in self._templated:
            found = candidate.regex.fullmatch(raw_path)
            if found:
                values = found.groupdict()
                return candidate, {
                    name: unquote(values[f"p{index}"])
                    for index, name in enumerate(candidate.params)
                }
        return None


# Responses of these types are streams (SSE, file downloads): passed on as they are written,
# never buffered to be checked.
STREAMED_MEDIA_TYPES = frozenset(
    {"text/event-stream", "application/octet-stream", "application/x-tar"}
)


def _is_streaming(op: dict[str, Any]) -> bool:
    for response in op.get("responses", {}).values():
        if STREAMED_MEDIA_TYPES & set(response.get("content") or {}):
            return True
    return False


def _streams_request_body(op: dict[str, Any]) -> bool:
    """Bodies that are not JSON (image archives, volume contents) are streamed to the
    handler rather than buffered for validation; only their parameters are checked."""
    content = (op.get("requestBody") or {}).get("content") or {}
    return bool(content) and not any("json" in media_type for media_type in content)
