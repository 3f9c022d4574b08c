"""The collector settings a wide fan-out changes are restored, however fan-outs overlap."""

from __future__ import annotations

import gc
import weakref

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

    def test_many_narrow_fan_outs_together_pause_collection(self) -> None:
        """A service's concurrent queries: fan-outs of 20 sub-calls each pause collection
        once together they hold MIN_PROMPTS in flight, and it resumes (the freeze undone)
        when those still running hold fewer."""
        assert gc.isenabled()
        frozen = gc.get_freeze_count()
        width = 20
        fan_outs = [long_lived_frozen(width) for _ in range(-(-MIN_PROMPTS // width))]
        for k, fan_out in enumerate(fan_outs, start=1):
            fan_out.__enter__()
            assert gc.isenabled() == (k * width < MIN_PROMPTS), k
        fan_outs[0].__exit__(None, None, None)  # still >= MIN_PROMPTS only if one was spare
        assert gc.isenabled() == ((len(fan_outs) - 1) * width < MIN_PROMPTS)
        for fan_out in fan_outs[1:]:
            fan_out.__exit__(None, None, None)
        assert gc.isenabled() and gc.get_freeze_count() == frozen
        assert _gc._in_flight == 0

    def test_collection_pauses_again_when_fan_outs_pile_up_again(self) -> None:
        """Below the threshold the pause ends even with fan-outs still running; rising past
        it again starts a new one."""
        small, wide = long_lived_frozen(10), long_lived_frozen(MIN_PROMPTS)
        small.__enter__()
        wide.__enter__()
        assert not gc.isenabled()
        wide.__exit__(None, None, None)
        assert gc.isenabled()  # 10 left in flight
        with long_lived_frozen(MIN_PROMPTS - 10):
            assert not gc.isenabled()
        assert gc.isenabled()
        small.__exit__(None, None, None)
        assert _gc._in_flight == 0

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
        full collection, which frees cyclic garbage made meanwhile, a cycle that had aged
        into the oldest generation too, and the pause goes on."""
        now = [0.0]

        def clock() -> float:
            return now[0]

        class Cycle:
            def __init__(self) -> None:
                self.me = self

        outer = long_lived_frozen(MIN_PROMPTS, clock=clock)
        outer.__enter__()
        try:
            aged = Cycle()
            gc.collect(1)  # it survives a young collection: now in the oldest generation
            aged_ref = weakref.ref(aged)
            del aged  # garbage only a full collection can free
            young_ref = weakref.ref(Cycle())  # garbage any collection frees
            now[0] = MAX_PAUSE_S - 1
            with long_lived_frozen(MIN_PROMPTS, clock=clock):
                assert young_ref() is not None and aged_ref() is not None  # too early: nothing ran
            now[0] = MAX_PAUSE_S + 1
            with long_lived_frozen(MIN_PROMPTS, clock=clock):
                assert young_ref() is None and aged_ref() is None
                assert not gc.isenabled()
            assert _gc._paused_at == MAX_PAUSE_S + 1
        finally:
            outer.__exit__(None, None, None)
        assert gc.isenabled()
