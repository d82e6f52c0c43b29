"""`yibao bench`'s in-process figures: what it prints is measured on the pipeline the worker runs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from yibao.bench import _settlements, event_time_costs
from yibao.settings import Settings

from ..harness import default_settings


@pytest.fixture()
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with default_settings(tmp_path_factory.mktemp("cwd")) as s:
        yield s


def test_event_time_costs_measures_identity_and_rules_in_order_and_as_delivered(settings: Settings) -> None:
    frames, lines = _settlements(400, 3, 10.0)
    assert len(frames) == 400 and 9.0 < lines / 400 < 11.0
    costs = event_time_costs(settings, frames)
    assert set(costs) == {f"{stage}_{order}_us" for stage in ("identity", "rules")
                          for order in ("in_order", "delivered")}
    assert all(v > 0 for v in costs.values()), costs
