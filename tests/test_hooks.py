from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest
from _events_factory import T0, call_start, node_finish, node_start, query_start, standard_run

from rlm_async._events import Event, IterationFinish, IterationStart, bind, emit, sinks
from rlm_async.exceptions import ConfigError
from rlm_async.hooks import EventStream, OfficialCallbacks


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any) -> None:
            self.calls.append((name, args))

        return record

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [args for n, args in self.calls if n == name]


def _adapter(rec: _Recorder, **kwargs: Any) -> OfficialCallbacks:
    return OfficialCallbacks(
        on_subcall_start=rec.on_subcall_start,
        on_subcall_complete=rec.on_subcall_complete,
        on_iteration_start=rec.on_iteration_start,
        on_iteration_complete=rec.on_iteration_complete,
        **kwargs,
    )


@pytest.fixture(params=[True, False], ids=["engine-style", "explicit-style"])
def engine_style(request: pytest.FixtureRequest) -> bool:
    """Both ways of making an RLM's own calls (see _events_factory)."""
    return bool(request.param)


class TestOfficialCallbacks:
    def test_a_child_rlm_is_a_subcall(self, engine_style: bool) -> None:
        """As in the official package, only child RLMs fire the subcall callbacks, with the child's depth."""
        rec = _Recorder()
        adapter = _adapter(rec)
        events = standard_run(engine_style=engine_style).events()
        for event in events:
            adapter(event)
        assert rec.named("on_subcall_start") == [(1, "small", "")]
        ((depth, model, duration, error),) = rec.named("on_subcall_complete")
        k1 = [e.time for e in events if e.kind.startswith("node.") and e.node_id == "k1"]
        assert (depth, model, error) == (1, "small", None)
        assert duration == pytest.approx(k1[1] - k1[0])

    def test_include_llm_calls_reports_every_sub_call_with_its_error(self, engine_style: bool) -> None:
        """include_llm_calls=True also fires for plain sub-calls (not root turns), passing errors."""
        rec = _Recorder()
        adapter = _adapter(rec, include_llm_calls=True)
        for event in standard_run(engine_style=engine_style).events():
            adapter(event)
        assert len(rec.named("on_subcall_start")) == 1 + 100 + 5 + 3
        completes = rec.named("on_subcall_complete")
        assert len(completes) == 109
        assert [c for c in completes if c[3] is not None] == [
            (1, "small", pytest.approx(1.1), "RateLimited: 429")
        ]

    def test_iterations_of_every_rlm_node(self, engine_style: bool) -> None:
        """Iteration callbacks fire for the root (depth 0) and child RLM (depth 1), with their durations."""
        rec = _Recorder()
        adapter = _adapter(rec)
        events = standard_run(engine_style=engine_style).events()
        for event in events:
            adapter(event)
        assert rec.named("on_iteration_start") == [(0, 1), (0, 2), (1, 1), (1, 2), (0, 3)]
        durations = [e.duration_s for e in events if isinstance(e, IterationFinish)]
        assert [c[2] for c in rec.named("on_iteration_complete")] == durations
        assert [c[:2] for c in rec.named("on_iteration_complete")] == [(0, 1), (1, 1), (1, 2), (0, 2), (0, 3)]

    def test_a_status_without_an_error_is_reported_as_the_error(self) -> None:
        """A child that ended with status "budget" and no message reports error "budget"."""
        rec = _Recorder()
        adapter = _adapter(rec)
        adapter(node_start(1.0, "q", "k", parent_id="root", depth=1))
        adapter(node_finish(3.0, "q", "k", depth=1, status="budget"))
        assert rec.named("on_subcall_complete") == [(1, "m", 2.0, "budget")]

    def test_a_failing_callback_does_not_break_emit(self) -> None:
        """A callback that raises is swallowed by emit; the next event still reaches it."""
        seen: list[int] = []

        def broken(depth: int, iteration: int) -> None:
            seen.append(iteration)
            raise RuntimeError("observer bug")

        with sinks(OfficialCallbacks(on_iteration_start=broken)), bind(query_id="q", node_id="root", depth=0):
            emit(IterationStart, iteration=1)
            emit(IterationStart, iteration=2)
        assert seen == [1, 2]


class TestEventStream:
    @pytest.mark.asyncio
    async def test_a_consumer_receives_every_event_in_order(self) -> None:
        """Events emitted under `sinks(stream)` arrive in order at `async for`, then the stream ends."""
        events = standard_run().events()
        got: list[Event] = []
        stream = EventStream(max_buffer=64)

        async def consume() -> None:
            async for event in stream:
                got.append(event)

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            with stream, sinks(stream):
                for event in events:
                    stream(event)
                    await (
                        anyio.lowlevel.checkpoint()
                    )  # the engine yields at its awaits; so does this producer
        assert got == events and stream.dropped == 0

    @pytest.mark.asyncio
    async def test_a_full_buffer_drops_the_oldest_and_counts(self) -> None:
        """When nobody reads, the sink keeps the newest `max_buffer` events and counts the rest as dropped."""
        stream = EventStream(max_buffer=10)
        events = [call_start(T0 + i, str(i)) for i in range(25)]
        for event in events:
            stream(event)  # synchronous: it cannot block
        stream.close()
        got = [event async for event in stream]
        assert got == events[-10:] and stream.dropped == 15

    @pytest.mark.asyncio
    async def test_kinds_filter_and_close_on_query_finish(self) -> None:
        """Only the chosen kinds are streamed, and query.finish ends the stream by itself."""
        stream = EventStream(kinds={"query.start", "query.finish"}, close_on_query_finish=True)
        for event in standard_run().events():
            stream(event)
        stream(query_start(T0 + 99, "q-late"))  # after the close: ignored
        assert [event.kind async for event in stream] == ["query.start", "query.finish"]

    @pytest.mark.asyncio
    async def test_events_after_the_consumer_left_are_ignored(self) -> None:
        """After aclose(), the sink discards events silently."""
        stream = EventStream()
        await stream.aclose()
        stream(query_start(1.0))
        assert [event async for event in stream] == []

    def test_a_buffer_must_hold_one_event(self) -> None:
        """max_buffer below 1 is refused at construction, naming the value."""
        with pytest.raises(ConfigError, match="max_buffer=0"):
            EventStream(max_buffer=0)
