"""Hooks for applications that embed rlm_async: callbacks, or an async stream of events.

Both are event sinks: pass them to `RLM(event_sinks=[...])` or `acompletion(...,
event_sinks=[...])`, or register them around a run with `rlm_async._events.sinks(...)`.
Events are the frozen dataclasses of `rlm_async._events`: match on the class, read its fields.

Callbacks, with the signatures of the official `rlm` package's `RLM(on_subcall_start=…)`
arguments, so code written against it carries over:

    adapter = OfficialCallbacks(on_subcall_start=show, on_subcall_complete=hide)
    await rlm.acompletion(context, root_prompt, event_sinks=[adapter])

(`RLM(on_subcall_start=…, …)` builds one of these itself.)

As in the official package, a "subcall" is a child RLM (`rlm_query`) and `depth` is the
child's depth. `include_llm_calls=True` adds every plain sub-call (`llm_query`,
`llm_batch`: calls of kind "sub"), timed by the call's own latency. Iteration callbacks
fire for every RLM node, root and children (the official package fires them for the root
only): filter on `depth`. `prompt_preview` is the first 200 characters of a sub-call's
prompt when the engine logs text (`RLMConfig(log_text=True)` puts it in `call.start`), and
empty otherwise and for child RLMs: prompts are private data and stay out of events by
default. A callback runs on the event loop and
must return quickly; an exception in it is logged and swallowed by `emit`.

An async stream, for consumers that await (a web server pushing server-sent events):

    stream = EventStream(max_buffer=1000)
    async with anyio.create_task_group() as tg:
        tg.start_soon(forward, stream)            # async for event in stream: ...
        with stream:                              # leaving the block ends the iteration
            await rlm.acompletion(context, root_prompt, event_sinks=[stream])

The stream never blocks the engine: when the consumer falls behind and the buffer is
full, the oldest buffered event is dropped to make room and `stream.dropped` counts it
(a live view cares more about now than about a backlog; a complete record is the trace
file's job). The sink must be called on the event loop's thread, as `emit` does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import TracebackType

import anyio

from ._events import (
    CallFinish,
    CallStart,
    Event,
    IterationFinish,
    IterationStart,
    NodeFinish,
    NodeStart,
)
from .exceptions import ConfigError

__all__ = [
    "EventStream",
    "OfficialCallbacks",
    "OnIterationComplete",
    "OnIterationStart",
    "OnSubcallComplete",
    "OnSubcallStart",
]

_PREVIEW_CHARS = 200

OnSubcallStart = Callable[[int, str, str], None]
"""(depth, model, prompt_preview)"""
OnSubcallComplete = Callable[[int, str, float, str | None], None]
"""(depth, model, duration_s, error or None)"""
OnIterationStart = Callable[[int, int], None]
"""(depth, iteration)"""
OnIterationComplete = Callable[[int, int, float], None]
"""(depth, iteration, duration_s)"""


class OfficialCallbacks:
    """An event sink that calls the official `rlm` package's four callbacks.

    A child RLM's duration is the difference of its node's event times (the engine
    clock); a sub-call's is its latency, an iteration's the engine's own `duration_s`.
    """

    def __init__(
        self,
        on_subcall_start: OnSubcallStart | None = None,
        on_subcall_complete: OnSubcallComplete | None = None,
        on_iteration_start: OnIterationStart | None = None,
        on_iteration_complete: OnIterationComplete | None = None,
        *,
        include_llm_calls: bool = False,
    ) -> None:
        self.on_subcall_start = on_subcall_start
        self.on_subcall_complete = on_subcall_complete
        self.on_iteration_start = on_iteration_start
        self.on_iteration_complete = on_iteration_complete
        self.include_llm_calls = include_llm_calls
        self._open: dict[str, tuple[float, int, str]] = {}
        """child RLM node id, or "call <call_id>", in progress -> (start time, depth, model)"""
        self._depths: dict[str, int] = {}

    def __call__(self, event: Event) -> None:
        match event:
            case NodeStart():
                self._node_start(event)
            case NodeFinish():
                node_id = str(event.node_id)
                self._depths.pop(node_id, None)
                self._complete(self._open.pop(node_id, None), event, event.time)
            case CallStart():
                if self.include_llm_calls and event.call_kind == "sub":
                    self._subcall_start(f"call {event.call_id}", event, event.model, event.prompt)
            case CallFinish():
                opened = self._open.pop(f"call {event.call_id}", None)
                self._complete(
                    opened, event, opened[0] + event.latency_s if opened is not None else event.time
                )
            case IterationStart():
                if self.on_iteration_start is not None:
                    self.on_iteration_start(self._depth(event), event.iteration)
            case IterationFinish():
                if self.on_iteration_complete is not None:
                    self.on_iteration_complete(self._depth(event), event.iteration, event.duration_s)

    def _node_start(self, event: NodeStart) -> None:
        if event.node_kind != "rlm":
            return
        node_id = str(event.node_id)
        self._depths[node_id] = self._depth(event)
        if event.parent_id is not None:  # a child RLM
            self._subcall_start(node_id, event, event.model, None)

    def _subcall_start(self, key: str, event: Event, model: str, prompt: str | None) -> None:
        depth = self._depth(event)
        self._open[key] = (event.time, depth, model)
        if self.on_subcall_start is not None:
            self.on_subcall_start(depth, model, (prompt or "")[:_PREVIEW_CHARS])

    def _complete(
        self, opened: tuple[float, int, str] | None, event: NodeFinish | CallFinish, end: float
    ) -> None:
        if opened is None or self.on_subcall_complete is None:
            return
        started, depth, model = opened
        error = event.error or (None if event.status == "ok" else event.status)
        self.on_subcall_complete(depth, model, end - started, error)

    def _depth(self, event: Event) -> int:
        if event.depth is not None:
            return event.depth
        return self._depths.get(str(event.node_id), 0)


class EventStream:
    """An async iterator of events with a bounded buffer that drops the oldest when full.

    `close()` (or leaving `with stream:`) ends the iteration once the buffer is drained; a
    consumer that stops early calls `await stream.aclose()`, so that nothing stays open.
    """

    def __init__(
        self,
        max_buffer: int = 1000,
        *,
        kinds: Iterable[str] | None = None,
        close_on_query_finish: bool = False,
    ) -> None:
        if max_buffer < 1:
            raise ConfigError(f"EventStream(max_buffer={max_buffer}): the buffer must hold at least 1 event")
        self.kinds = frozenset(kinds) if kinds is not None else None
        """Only these event kinds are streamed; `None` streams all."""
        self.close_on_query_finish = close_on_query_finish
        """End the stream after the first `query.finish` it sees (a one-query stream)."""
        self.dropped = 0
        """Events discarded because the consumer fell `max_buffer` events behind."""
        self._send, self._receive = anyio.create_memory_object_stream[Event](max_buffer)

    def __call__(self, event: Event) -> None:
        if self.kinds is not None and event.kind not in self.kinds:
            return
        try:
            try:
                self._send.send_nowait(event)
            except anyio.WouldBlock:
                # Full, so no consumer is waiting: taking one out cannot race with it.
                try:
                    self._receive.receive_nowait()
                except anyio.WouldBlock:  # pragma: no cover - full implies non-empty
                    pass
                self.dropped += 1
                self._send.send_nowait(event)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return  # closed, or the consumer went away: nobody to tell
        if self.close_on_query_finish and event.kind == "query.finish":
            self.close()

    def close(self) -> None:
        """No more events; the consumer's `async for` ends after the buffered ones."""
        self._send.close()

    async def aclose(self) -> None:
        """Close both ends now, discarding anything still buffered."""
        self._send.close()
        self._receive.close()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._receive.close()
            raise StopAsyncIteration from None

    def __enter__(self) -> EventStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
