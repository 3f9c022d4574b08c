"""The collector settings a wide fan-out changes are restored, however fan-outs overlap."""

from __future__ import annotations

import gc

from rlm_async import _gc
from rlm_async._gc import MAX_PAUSE_S, MIN_PROMPTS, long_lived_frozen


class TestLongLivedFrozen:
    def test_overlapping_fan_outs_restore_the_settings(self) -> None:
        """Two fan-outs that start and end out of order pause collection until the last
        ends, then leave the collector and the freeze as found."""
        assert gc.isenabled()
        frozen = gc.get_freeze_count()
        first, second = long_lived_frozen(MIN_PROMPTS), long_lived_frozen(MIN_PROMPTS)
        first.__enter__()
        assert not gc.isenabled()
        second.__enter__()
        first.__exit__(None, None, None)
        assert not gc.isenabled()  # one still running
        second.__exit__(None, None, None)
        assert gc.isenabled() and gc.get_freeze_count() == frozen

    def test_narrow_fan_outs_are_left_alone(self) -> None:
        """Below MIN_PROMPTS nothing changes."""
        with long_lived_frozen(MIN_PROMPTS - 1):
            assert gc.isenabled()

    def test_a_collector_disabled_by_the_process_stays_disabled(self) -> None:
        """A process that turned collection off itself finds it off after a fan-out."""
        gc.disable()
        try:
            with long_lived_frozen(MIN_PROMPTS):
                assert not gc.isenabled()
            assert not gc.isenabled()
        finally:
            gc.enable()

    def test_overlapping_fan_outs_collect_after_max_pause(self) -> None:
        """When fan-outs keep overlapping, one that starts after MAX_PAUSE_S of pause runs a
        collection that frees cyclic garbage made meanwhile, and the pause goes on."""
        now = [0.0]

        def clock() -> float:
            return now[0]

        class Cycle:
            def __init__(self) -> None:
                self.me = self

        outer = long_lived_frozen(MIN_PROMPTS, clock=clock)
        outer.__enter__()
        try:
            Cycle()  # garbage only a collection can free
            before = gc.get_count()[0] + gc.get_count()[1]
            now[0] = MAX_PAUSE_S - 1
            with long_lived_frozen(MIN_PROMPTS, clock=clock):
                assert gc.get_count()[0] + gc.get_count()[1] >= before  # too early: nothing ran
            now[0] = MAX_PAUSE_S + 1
            collected = gc.get_stats()[1]["collected"]
            with long_lived_frozen(MIN_PROMPTS, clock=clock):
                assert gc.get_stats()[1]["collected"] > collected
                assert not gc.isenabled()
            assert _gc._paused_at == MAX_PAUSE_S + 1
        finally:
            outer.__exit__(None, None, None)
        assert gc.isenabled()
