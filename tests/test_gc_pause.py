"""The collector settings a fan-out changes are restored, however fan-outs overlap."""

from __future__ import annotations

import gc
import weakref

import pytest
from conftest import open_sim, sim_config

from rlm_async import _gc
from rlm_async._events import CallStart, Event
from rlm_async._gc import MAX_PAUSE_S, long_lived_frozen
from rlm_async._rlm import RLM
from rlm_async.sim import Policies, PolicySpec, SimConfig
from rlm_async.workloads import oolong_counting

WIDTH = 20
"""A service query's fan-out (`configs/sim.toml`'s chunks)."""


class TestLongLivedFrozen:
    def test_overlapping_fan_outs_restore_the_settings(self) -> None:
        """Two fan-outs that start and end out of order pause collection until the last
        ends, then leave the collector and the freeze as found."""
        assert gc.isenabled()
        frozen = gc.get_freeze_count()
        first, second = long_lived_frozen(WIDTH), long_lived_frozen(WIDTH)
        first.__enter__()
        assert not gc.isenabled()
        second.__enter__()
        first.__exit__(None, None, None)
        assert not gc.isenabled()  # one still running
        second.__exit__(None, None, None)
        assert gc.isenabled() and gc.get_freeze_count() == frozen

    def test_a_fan_out_of_nothing_changes_nothing(self) -> None:
        with long_lived_frozen(0):
            assert gc.isenabled()
        assert _gc._in_flight == 0

    def test_the_first_fan_out_pauses_and_the_last_resumes(self) -> None:
        """A service's concurrent queries: collection pauses as the first fan-out starts,
        however narrow (a full collection walks the whole heap, whatever the fan-out's
        width), and resumes, the freeze undone, only when the last one ends."""
        assert gc.isenabled()
        frozen = gc.get_freeze_count()
        fan_outs = [long_lived_frozen(width) for width in (1, WIDTH, WIDTH)]
        for fan_out in fan_outs:
            fan_out.__enter__()
            assert not gc.isenabled()
        for fan_out in fan_outs[:-1]:
            fan_out.__exit__(None, None, None)
            assert not gc.isenabled()  # one still running
        fan_outs[-1].__exit__(None, None, None)
        assert gc.isenabled() and gc.get_freeze_count() == frozen
        assert _gc._in_flight == 0

    def test_collection_pauses_again_when_a_fan_out_starts_again(self) -> None:
        with long_lived_frozen(WIDTH):
            assert not gc.isenabled()
        assert gc.isenabled()
        with long_lived_frozen(WIDTH):
            assert not gc.isenabled()
        assert gc.isenabled() and _gc._in_flight == 0

    def test_a_collector_disabled_by_the_process_stays_disabled(self) -> None:
        """A process that turned collection off itself finds it off after a fan-out."""
        gc.disable()
        try:
            with long_lived_frozen(WIDTH):
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

        outer = long_lived_frozen(WIDTH, clock=clock)
        outer.__enter__()
        try:
            aged = Cycle()
            gc.collect(1)  # it survives a young collection: now in the oldest generation
            aged_ref = weakref.ref(aged)
            del aged  # garbage only a full collection can free
            young_ref = weakref.ref(Cycle())  # garbage any collection frees
            now[0] = MAX_PAUSE_S - 1
            with long_lived_frozen(WIDTH, clock=clock):
                assert young_ref() is not None and aged_ref() is not None  # too early: nothing ran
            now[0] = MAX_PAUSE_S + 1
            with long_lived_frozen(WIDTH, clock=clock):
                assert young_ref() is None and aged_ref() is None
                assert not gc.isenabled()
            assert _gc._paused_at == MAX_PAUSE_S + 1
        finally:
            outer.__exit__(None, None, None)
        assert gc.isenabled()


@pytest.mark.e2e
class TestThroughTheEngine:
    @pytest.mark.asyncio
    async def test_a_narrow_fan_out_runs_with_the_collector_paused(self) -> None:
        """A query whose one fan-out has 4 sub-calls, against the simulator over HTTP: the
        collector is off as each sub-call starts and back on once the query is done, the
        freeze undone."""
        w = oolong_counting("16k", seed=3)
        frozen = gc.get_freeze_count()
        seen: list[bool] = []

        def sink(event: Event) -> None:
            if isinstance(event, CallStart) and event.call_kind == "sub":
                seen.append(gc.isenabled())

        policies = Policies(root=PolicySpec(name="rlm", options={"chunks": 4}))
        async with open_sim(SimConfig(policies=policies)) as sim:
            async with RLM(config=sim_config(sim), event_sinks=[sink]) as rlm:
                result = await rlm.acompletion(w.context, w.query)
        assert result.status == "ok" and w.score(result.response), result.response
        assert seen == [False] * 4, seen
        assert gc.isenabled() and gc.get_freeze_count() == frozen and _gc._in_flight == 0
