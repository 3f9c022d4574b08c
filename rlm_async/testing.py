"""Public test doubles: a scripted transport, at the lowest layer.

    from rlm_async.testing import ScriptedTransport

    def reply(request):
        return "42"

    transport = ScriptedTransport(reply)

The handler may be sync or async and may return a `str` (usage is then estimated as
characters / 4), a full `Completion`, or raise any `rlm_async.exceptions.TransportError`
to simulate a failure. Every request is kept in `transport.requests`, in arrival order,
and `transport.max_in_flight` records the peak number of concurrent calls.

`ManualClock` and `wait_until_idle` (from the governor) move time by hand in tests of
limits, retries and budgets: pass `clock=` and `sleep=` to `Governor`.

`capture_events()` collects the events the engine really emits inside a block, as
structlog's `testing.capture_logs()` collects log entries, so a test asserts on what a run
did rather than on events built by hand:

    from rlm_async._events import CallRetry

    with capture_events() as events:
        result = await rlm.acompletion(context, root_prompt)
    assert len(events.of(CallRetry)) == 2
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from . import _events
from ._events import Event
from ._governor import ManualClock, wait_until_idle
from ._types import Completion, ModelRequest, Usage
from .transport import Transport

__all__ = [
    "CapturedEvents",
    "Handler",
    "ManualClock",
    "ScriptedTransport",
    "capture_events",
    "estimate_usage",
    "wait_until_idle",
]

_E = TypeVar("_E", bound=Event)

HandlerResult = str | Completion
Handler = Callable[[ModelRequest], HandlerResult | Awaitable[HandlerResult]]


def estimate_usage(request: ModelRequest, text: str) -> Usage:
    """A deterministic stand-in for a tokenizer: four characters a token, at least one."""
    return Usage(
        prompt_tokens=max(1, request.prompt_chars() // 4),
        completion_tokens=max(1, len(text) // 4),
    )


class ScriptedTransport(Transport):
    """A `Transport` whose replies come from a function of the request. No network."""

    def __init__(self, handler: Handler, *, endpoint: str = "scripted://") -> None:
        self.endpoint = endpoint
        self._handler = handler
        self.requests: list[ModelRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.closed = False

    async def complete(self, request: ModelRequest) -> Completion:
        self.requests.append(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            result = self._handler(request)
            if inspect.isawaitable(result):
                result = await result
        finally:
            self.in_flight -= 1
        if isinstance(result, Completion):
            return result
        return Completion(text=result, usage=estimate_usage(request, result), model=request.model)

    async def aclose(self) -> None:
        self.closed = True


class CapturedEvents(list[Event]):
    """The events captured by `capture_events()`, in emission order: a list, plus filters."""

    def of(self, kind: type[_E]) -> list[_E]:
        """The captured events of one kind (class), typed as such."""
        return [e for e in self if isinstance(e, kind)]

    def kinds(self) -> list[str]:
        """The dotted kind of each event, in order."""
        return [e.kind for e in self]


@contextmanager
def capture_events(*kinds: type[Event]) -> Iterator[CapturedEvents]:
    """Collect every event emitted inside the block (and in the tasks it starts), whatever
    other sinks listen; only those of `kinds` (event classes) when given.

    It listens through the same context variable as every sink, so it sees what the real
    engine emits, queries started inside the block included (`RLM.completion` too: the
    event loop it starts inherits the block's context). Not for a sink of your own: pass
    that to `RLM(event_sinks=[...])`."""
    captured = CapturedEvents()
    sink: _events.EventSink = captured.append
    if kinds:

        def sink(event: Event) -> None:
            if isinstance(event, kinds):
                captured.append(event)

    with _events.sinks(sink):
        yield captured
