"""The public test doubles of `rlm_async.testing`: here, `capture_events()`."""

from __future__ import annotations

import pytest

from rlm_async._events import CallFinish, CallStart, QueryFinish, QueryStart, emit
from rlm_async._rlm import RLM
from rlm_async._types import ModelRequest
from rlm_async.testing import ScriptedTransport, capture_events


def _reply(request: ModelRequest) -> str:
    turns = sum(m.role == "assistant" for m in request.messages)
    if request.messages[-1].content == "leaf":
        return "leaf answer"
    return "```repl\nprint(llm_query('leaf'))\n```" if turns == 0 else "FINAL(42)"


def _rlm() -> RLM:
    return RLM(
        backend="openai",
        backend_kwargs={"model_name": "gpt-5-mini", "api_key": "unused"},
        transport=ScriptedTransport(_reply),
    )


class TestCaptureEvents:
    def test_collects_what_a_real_completion_emits(self) -> None:
        """The events of a synchronous `completion()` inside the block are captured, typed and
        in order, from query.start to query.finish, with no sink passed to the RLM."""
        with capture_events() as events:
            result = _rlm().completion("some context", root_prompt="what?")
        assert result.response == "42"
        assert isinstance(events[0], QueryStart) and isinstance(events[-1], QueryFinish)
        starts, finishes = events.of(CallStart), events.of(CallFinish)
        assert [c.call_kind for c in starts] == ["root", "sub", "root"]
        assert [c.call_id for c in finishes] == [c.call_id for c in result.calls]
        assert events.of(QueryFinish)[0].calls == result.total.calls == 3

    @pytest.mark.asyncio
    async def test_kinds_filter_what_is_kept(self) -> None:
        """Given event classes, only events of those kinds are kept."""
        with capture_events(CallStart, QueryFinish) as events:
            async with _rlm() as rlm:
                await rlm.acompletion("some context", root_prompt="what?")
        assert events.kinds() == ["call.start", "call.start", "call.start", "query.finish"]

    def test_nothing_is_captured_after_the_block(self) -> None:
        """Leaving the block stops the capture; emit then has nobody to tell."""
        with capture_events() as events:
            pass
        assert emit(QueryFinish, status="ok", wall_s=0.0) is None
        assert events == []
