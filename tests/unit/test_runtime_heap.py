"""`mesh.runtime.freeze_heap`: what a data plane process has built by the time it is synced is kept out
of the cyclic collector's passes (whose full pass otherwise stalls every connection), after the cyclic
garbage of the start is collected."""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Iterator

import pytest

from mesh import runtime


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the rest of the test process goes on as before


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_what_lives_is_frozen_and_cyclic_garbage_is_collected_first(
        unfrozen: None, caplog: pytest.LogCaptureFixture) -> None:
    kept = [_Cycle() for _ in range(100)]  # alive: frozen
    for _ in range(50):
        _Cycle()  # garbage only the cyclic collector frees: collected, not frozen
    log = logging.getLogger("test.heap")
    with caplog.at_level(logging.INFO, logger="test.heap"):
        runtime.freeze_heap(log)
    assert gc.get_freeze_count() > len(kept)
    walked = {id(x) for x in gc.get_objects()}  # what the collector's passes walk: none of them
    assert all(gc.is_tracked(x) and id(x) not in walked for x in kept)
    (record,) = [json.loads(r.getMessage()) for r in caplog.records if "heap_frozen" in r.getMessage()]
    assert record["event"] == "heap_frozen" and record["objects"] > len(kept) and record["collected"] >= 50
