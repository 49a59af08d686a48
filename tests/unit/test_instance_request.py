"""The manager's own checks of a create request hold without the HTTP contract in front."""

from __future__ import annotations

import pytest

from managers.instances import CreateRequest
from managers.instances.errors import InvalidInstanceSpec


@pytest.mark.parametrize(
    "request_",
    [
        CreateRequest(name="web\n", image="app"),
        CreateRequest(name="web", image="app", env={"PATH\n": "/bin"}),
        CreateRequest(name="-web", image="app"),
        CreateRequest(name="w" * 64, image="app"),
        CreateRequest(name="web", image="app", workdir="relative"),
    ],
    ids=["name-final-newline", "env-final-newline", "leading-dash", "too-long", "workdir"],
)
def test_what_no_vm_can_be_made_of_is_refused(request_: CreateRequest) -> None:
    with pytest.raises(InvalidInstanceSpec):
        request_.check()


def test_a_plain_request_passes() -> None:
    CreateRequest(name="web-1", image="app", env={"PATH": "/bin"}, workdir="/app").check()
