"""The compiled fast path of contract validation agrees with jsonschema, schema by schema.

``dataplane.contract`` lets jsonschema-rs accept a value before openapi-core's
jsonschema sees it. That is only sound while the two agree; here every schema the
spec holds (parameters, bodies, responses, components) is checked with values
generated from the schema itself (mostly valid) and with those values broken in
one place (mostly invalid), against openapi-core's own OAS 3.1 validator.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema_path import SchemaPath
from openapi_core.validation.schemas import oas31_schema_validators_factory

from dataplane.contract import compile_fast
from dataplane.spec import Spec

DOCUMENT = Spec.load().document
METHODS = ("get", "put", "post", "delete", "patch")


Location = tuple[str | int, ...]


def schema_locations() -> Iterator[Location]:
    for path, item in DOCUMENT["paths"].items():
        for method in METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            base = ("paths", path, method)
            for index, parameter in enumerate(operation.get("parameters", [])):
                if "$ref" in parameter:
                    yield (*parameter["$ref"].removeprefix("#/").split("/"), "schema")
                else:
                    yield (*base, "parameters", index, "schema")
            for media in operation.get("requestBody", {}).get("content", {}):
                yield (*base, "requestBody", "content", media, "schema")
            for status, response in operation.get("responses", {}).items():
                for media in response.get("content", {}):
                    yield (*base, "responses", status, "content", media, "schema")
    for name in DOCUMENT["components"]["schemas"]:
        yield ("components", "schemas", name)


def node(parts: Location) -> Any:
    value: Any = DOCUMENT
    for part in parts:
        value = value[part]
    return value


def inline(schema: Any) -> Any:
    """The schema with every ``$ref`` replaced by its target (the spec has no cycles)."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            target = inline(node(tuple(schema["$ref"].removeprefix("#/").split("/"))))
            rest = {k: inline(v) for k, v in schema.items() if k != "$ref"}
            return {**target, **rest} if rest else target
        return {k: inline(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [inline(v) for v in schema]
    return schema


# Raw bodies (contentMediaType) are streamed past the contract, never validated as JSON.
LOCATIONS = [
    loc for loc in dict.fromkeys(schema_locations()) if "contentMediaType" not in node(loc)
]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)
WORDS = st.text("abcxyz-_./:@09AZ", max_size=12)


def values(schema: Any) -> st.SearchStrategy[Any]:
    """Values meant to satisfy ``schema``: the keywords the spec uses, nothing more."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "oneOf" in schema:
        return st.one_of([values(branch) for branch in schema["oneOf"]])
    kinds = schema.get("type", ["null", "boolean", "integer", "string"])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    return st.one_of([_of_type(kind, schema) for kind in kinds])


def _of_type(kind: str, schema: Any) -> st.SearchStrategy[Any]:
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind in ("integer", "number"):
        low, high = schema.get("minimum"), schema.get("maximum")
        integers = st.integers(low, high)
        if kind == "number":
            return integers | st.floats(low, high, allow_nan=False, allow_infinity=False)
        return integers
    if kind == "string":
        if schema.get("format") == "date-time":
            return st.datetimes(timezones=st.just(UTC)).map(datetime.isoformat)
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        return st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength", 16))
    if kind == "array":
        items = values(schema.get("items", {}))
        return st.lists(items, max_size=min(schema.get("maxItems", 3), 3))
    assert kind == "object", kind
    properties = schema.get("properties", {})
    required = set(schema.get("required", ()))
    extra = schema.get("additionalProperties", True)
    names = values({"type": "string", **schema.get("propertyNames", {})})
    extras = (
        st.dictionaries(names, JSON if extra is True else values(extra), max_size=2)
        if extra is not False
        else st.just({})
    )
    return st.fixed_dictionaries(
        {k: values(v) for k, v in properties.items() if k in required},
        optional={k: values(v) for k, v in properties.items() if k not in required},
    ).flatmap(lambda fixed: extras.map(lambda more: {**more, **fixed}))


def broken(value: Any, data: st.DataObject) -> Any:
    """``value`` with one member (or itself) replaced by arbitrary JSON, or a string
    of it given a final newline (where Python's ``$`` and JSON Schema's differ)."""
    if isinstance(value, dict) and value and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(value)))
        return {**value, key: broken(value[key], data)}
    if isinstance(value, list) and value and data.draw(st.booleans()):
        index = data.draw(st.integers(0, len(value) - 1))
        return [*value[:index], broken(value[index], data), *value[index + 1 :]]
    if isinstance(value, str) and data.draw(st.booleans()):
        return value + "\n"
    return data.draw(JSON)


def has_final_newline(value: Any) -> bool:
    if isinstance(value, str):
        return value.endswith("\n")
    if isinstance(value, dict):
        return any(has_final_newline(k) or has_final_newline(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_final_newline(v) for v in value)
    return False


def test_every_schema_of_the_spec_is_covered() -> None:
    # A response or body schema that generation cannot handle must not drop out silently.
    assert len(LOCATIONS) >= 40


@pytest.mark.parametrize("location", LOCATIONS, ids=lambda loc: "/".join(map(str, loc[1:])))
def test_fast_and_reference_validators_agree(location: Location) -> None:
    spec = SchemaPath.from_dict(DOCUMENT)
    reference = oas31_schema_validators_factory.create(spec, spec.joinpath(*location)).validator
    fast = compile_fast(DOCUMENT, node(location))

    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(st.data())
    def agree(data: st.DataObject) -> None:
        value = data.draw(values(inline(node(location))))
        for candidate in (value, broken(value, data)):
            expected = not any(True for _ in reference.iter_errors(candidate))
            if fast.is_valid(candidate) != expected:
                # The one sanctioned difference: the reference lets a pattern's `$` match
                # before a final newline, JSON Schema (and the fast validator) does not.
                assert expected, candidate
                assert has_final_newline(candidate), candidate

    agree()
