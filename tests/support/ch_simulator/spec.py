"""Request validation against Cloud Hypervisor's own OpenAPI description (v53.0).

Objects in that file leave ``additionalProperties`` open; the simulator closes every object that
lists its properties, so a misspelt field (which the real binary might silently ignore) fails the
test that sent it. That is the only place it is stricter than the file.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from openapi_schema_validator import OAS30Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

_URN = "urn:cloud-hypervisor-api"


def default_spec_path() -> Path:
    override = os.environ.get("CH_SIMULATOR_SPEC")
    if override:
        return Path(override)
    project = Path(__file__).resolve().parents[3]
    return project.parent / "shared" / "reference" / "cloud-hypervisor-api.yaml"


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
