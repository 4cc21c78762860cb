"""dengine.gc_tuning: the collector settings a busy node's process runs with."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from dengine.gc_tuning import YOUNG_THRESHOLD, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    before = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.usefixtures("restored_gc")
def test_tuning_raises_the_young_threshold_and_freezes_what_is_alive() -> None:
    _, middle, old = gc.get_threshold()
    gc.unfreeze()
    tune_gc()
    assert gc.get_threshold() == (YOUNG_THRESHOLD, middle, old)
    assert gc.get_freeze_count() > 0, "objects alive at tuning time are out of later full passes"


@pytest.mark.usefixtures("restored_gc")
def test_a_young_threshold_below_one_is_refused_and_changes_nothing() -> None:
    before = gc.get_threshold()
    with pytest.raises(ValueError, match="at least 1"):
        tune_gc(young=0)
    assert gc.get_threshold() == before
