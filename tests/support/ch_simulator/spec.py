"""Request validation against Cloud Hypervisor's own OpenAPI description (v53.0).

Objects in that file leave ``additionalProperties`` open; the simulator closes every object that
lists its properties, so a misspelt field (which the real binary might silently ignore) fails the
test that sent it. That is the only place it is stricter than the file.

The file is third-party and is never copied into this repository: it is read from
``CH_SIMULATOR_SPEC`` or, by default, from ``../shared/reference/`` beside the clone. Where it is
absent, every test that needs the simulator skips with one reason (:func:`require_spec`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from openapi_schema_validator import OAS30Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

_URN = "urn:cloud-hypervisor-api"
SPEC_VARIABLE = "CH_SIMULATOR_SPEC"
MISSING = "Cloud Hypervisor reference spec not found"


def default_spec_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where the simulator reads the reference, given the environment it runs in."""
    override = (os.environ if environ is None else environ).get(SPEC_VARIABLE)
    if override:
        return Path(override)
    project = Path(__file__).resolve().parents[3]
    return project.parent / "shared" / "reference" / "cloud-hypervisor-api.yaml"


def missing_spec_reason(environ: Mapping[str, str] | None = None) -> str | None:
    """None when the reference is there; else the one line that says where it was looked for."""
    path = default_spec_path(environ)
    if path.is_file():
        return None
    return f"{MISSING} at {path} (set {SPEC_VARIABLE})"


def require_spec(environ: Mapping[str, str] | None = None) -> None:
    """Skip the calling test when the simulator could not start for want of its reference.

    Both ways a test starts the simulator (``hypervisor_harness.harness_for`` and
    ``server.run_server`` with the simulator as ``CLOUD_HYPERVISOR_BIN``) call this, so a plain
    clone skips those tests instead of erroring; ``tests/conftest.py`` folds them into one line.
    """
    reason = missing_spec_reason(environ)
    if reason is not None:
        # Imported here: the simulator process imports this module and never needs pytest.
        import pytest

        pytest.skip(reason)


@dataclass(frozen=True, slots=True)
class Operation:
    method: str
    endpoint: str
    body_schema: str | None  # component name, None for a bodiless action


class ApiSpec:
    def __init__(self, path: Path) -> None:
        document = yaml.safe_load(path.read_text())
        self.operations: dict[tuple[str, str], Operation] = {}
        for route, item in document["paths"].items():
            for method, operation in item.items():
                schema_name = None
                body = operation.get("requestBody")
                if body is not None:
                    ref = body["content"]["application/json"]["schema"]["$ref"]
                    schema_name = ref.rsplit("/", 1)[1]
                endpoint = route.lstrip("/")
                self.operations[(method.upper(), endpoint)] = Operation(
                    method.upper(), endpoint, schema_name
                )
        closed = _close_objects(copy.deepcopy(document))
        self._registry: Registry[Any] = Registry().with_resource(
            _URN, Resource.from_contents(closed, default_specification=DRAFT4)
        )
        self._validators: dict[str, OAS30Validator] = {}

    def endpoints(self, endpoint: str) -> list[str]:
        return [method for (method, name) in self.operations if name == endpoint]

    def errors(self, schema_name: str, value: Any) -> list[str]:
        validator = self._validators.get(schema_name)
        if validator is None:
            validator = OAS30Validator(
                {"$ref": f"{_URN}#/components/schemas/{schema_name}"},
                registry=self._registry,
                format_checker=OAS30Validator.FORMAT_CHECKER,
            )
            self._validators[schema_name] = validator
        found = []
        for error in validator.iter_errors(value):
            where = "/".join(str(part) for part in error.absolute_path) or "(body)"
            found.append(f"{schema_name} {where}: {error.message}")
        return sorted(found)


def _close_objects(node: Any) -> Any:
    if isinstance(node, dict):
        for value in node.values():
            _close_objects(value)
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
    elif isinstance(node, list):
        for value in node:
            _close_objects(value)
    return node
