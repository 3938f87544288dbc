"""The command's run quiets the cyclic GC for its own duration only (engine.cli._quiet_gc)."""

from __future__ import annotations

import gc

from engine import cli


def test_a_run_of_the_command_freezes_start_up_and_then_leaves_the_gc_as_it_found_it() -> None:
    before = gc.get_threshold()
    frozen_before = gc.get_freeze_count()
    survivor = [object()]  # tracked by the GC, made before the run: frozen during it
    with cli._quiet_gc():
        assert gc.get_threshold()[0] >= cli._RUN_GC_THRESHOLD
        assert gc.get_threshold()[1:] == before[1:]
        assert gc.get_freeze_count() > frozen_before
        assert gc.isenabled()  # cycles made during the run are still collected
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
    assert gc.is_tracked(survivor)


def test_the_gc_is_restored_when_the_run_raises() -> None:
    before = gc.get_threshold()
    try:
        with cli._quiet_gc():
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
