"""The contract document itself."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from openapi_spec_validator.readers import read_from_filename

from dataplane.spec import Spec
from managers.images import parse_reference
from tests.support.server import ROOT

SPEC_PATH = ROOT / "openapi.yaml"
METHODS = ("get", "put", "post", "delete", "patch")


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    document = yaml.safe_load(SPEC_PATH.read_bytes())
    return [
        (method, path, item[method])
        for path, item in document["paths"].items()
        for method in METHODS
        if method in item
    ]


def test_spec_is_valid_openapi_3_1() -> None:
    document, _ = read_from_filename(str(SPEC_PATH))
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_packaged_spec_is_the_top_level_file() -> None:
    assert Spec.load().raw_yaml == SPEC_PATH.read_bytes()


@pytest.mark.parametrize(("method", "path", "op"), operations(), ids=lambda v: str(v)[:40])
def test_every_operation_documents_its_errors_in_the_error_shape(
    method: str, path: str, op: dict[str, Any]
) -> None:
    responses = op["responses"]
    assert "400" in responses, f"{method} {path} lacks 400"
    assert "500" in responses, f"{method} {path} lacks 500"
    if op.get("security") != []:
        assert "401" in responses, f"{method} {path} needs auth but does not document 401"
    document = yaml.safe_load(SPEC_PATH.read_bytes())
    for status, response in responses.items():
        if int(status) < 400:
            continue
        if "$ref" in response:
            response = document["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
        schema = response["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/Error"}, f"{method} {path} {status}"


def test_index_matches_literal_and_templated_paths() -> None:
    spec = Spec.load()
    health = spec.match("GET", "/health")
    assert health is not None
    assert health.operation.operation_id == "getHealth"
    assert health.operation.open
    asset = spec.match("GET", "/docs/assets/swagger-ui.css")
    assert asset is not None
    assert asset.path_params == {"asset": "swagger-ui.css"}
    assert spec.match("POST", "/health") is None
    assert spec.match("GET", "/nowhere") is None
    assert spec.match("GET", "/docs/assets/a/b") is None


def test_index_decodes_parameters_from_the_raw_path() -> None:
    spec = Spec.load()
    found = spec.match("GET", "/docs/assets/swagger%2Dui.css")
    assert found is not None
    assert found.path_params == {"asset": "swagger-ui.css"}


def _reference_pattern() -> str:
    document = yaml.safe_load(SPEC_PATH.read_bytes())
    return str(document["components"]["schemas"]["ImageReference"]["pattern"])


@settings(max_examples=300, deadline=None)
@given(st.from_regex(_reference_pattern(), fullmatch=True).filter(lambda r: len(r) <= 255))
def test_every_reference_the_spec_admits_is_one_the_parser_accepts(reference: str) -> None:
    # Were the spec looser than the parser, a schema-valid request would get a 400.
    parse_reference(reference)


def test_the_spec_documents_the_defaults_the_domain_applies() -> None:
    from dataclasses import fields

    from managers.instances import CreateRequest

    document = yaml.safe_load(SPEC_PATH.read_bytes())
    properties = document["components"]["schemas"]["CreateInstance"]["properties"]
    documented = {name: p["default"] for name, p in properties.items() if "default" in p}
    documented["network"] = properties["network"]["properties"]["enabled"]["default"]
    checked = 0
    for field in fields(CreateRequest):
        if field.name in documented:
            assert documented[field.name] == field.default, field.name
            checked += 1
    assert checked == len(documented)
