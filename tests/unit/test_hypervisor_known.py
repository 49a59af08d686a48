"""When a VMM's last answer may stand in for asking it again."""

from __future__ import annotations

import time

import pytest

from managers.hypervisors.known import MAX_AGE, KnownState
from managers.hypervisors.types import VmState


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    return now


def test_an_answer_holds_while_nothing_happened(clock: list[float]) -> None:
    answer = KnownState(VmState.RUNNING, request=7, mark=120)
    assert answer.holds(7, 120)
    assert not answer.holds(8, 120)  # a request since
    assert not answer.holds(7, 240)  # the VMM reported something since


def test_an_answer_lapses_with_age_whatever_else(clock: list[float]) -> None:
    # A hung VMM reports nothing and is sent nothing; only age makes it asked again.
    answer = KnownState(VmState.RUNNING, request=7, mark=120)
    clock[0] += MAX_AGE - 0.001
    assert answer.holds(7, 120)
    clock[0] += 0.002
    assert not answer.holds(7, 120)
