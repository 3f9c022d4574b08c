"""A fan-out lets go of each prompt when its call ends: a batch's memory falls as its
answers come in, instead of staying whole until the last answer (at 5,000 prompts of
13 KB that was 66 MB held to the end). Observed in the engine's own heap (`tracemalloc`),
never by timing."""

from __future__ import annotations

import tracemalloc

import anyio
import pytest
from conftest import rlm_config

from rlm_async import EndpointLimits
from rlm_async._prompts import sub_system_prompt
from rlm_async._rlm import RLM
from rlm_async._types import Completion, ModelRequest, Usage
from rlm_async.sandbox import WorkerRequest
from rlm_async.transport import Transport

PROMPTS = 100
PROMPT_CHARS = 100_000
"""10 MB of prompts in all: far above what the rest of a run allocates."""


class HeapAtEachCall(Transport):
    """Answers the root's two turns from a script, and each sub-call with "ok", noting the
    engine's traced heap as each sub-call arrives. It keeps no request (a transport that
    did would itself hold the prompts this test watches being freed)."""

    def __init__(self, code: str) -> None:
        self._code = code
        self.heap_at_sub_call: list[int] = []
        self.observation = ""

    async def complete(self, request: ModelRequest) -> Completion:
        if request.messages[0].content == sub_system_prompt():
            self.heap_at_sub_call.append(tracemalloc.get_traced_memory()[0])
            await anyio.lowlevel.checkpoint()
            text = "ok"
        elif any(m.role == "assistant" for m in request.messages):
            self.observation = request.messages[-1].content
            text = "FINAL(done)"
        else:
            text = f"```repl\n{self._code}\n```"
        return Completion(text=text, usage=Usage(prompt_tokens=10, completion_tokens=2), model=request.model)


class TestPromptsFreedAsCallsEnd:
    @pytest.mark.asyncio
    async def test_heap_at_the_last_call_holds_no_answered_prompt(self) -> None:
        """One call at a time: when the last of 100 sub-calls of 100 KB arrives, the 99
        answered prompts are gone from the engine's heap (before: all 100 were still held,
        by the worker's request, the fan-out and the cache plan)."""
        code = (
            f"r = llm_batch([str(i) + 'x' * {PROMPT_CHARS} for i in range({PROMPTS})])\nprint(len(r), set(r))"
        )
        transport = HeapAtEachCall(code)
        config = rlm_config(sub_overrides={"limits": EndpointLimits(max_concurrency=1, adaptive=False)})
        tracemalloc.start()
        try:
            async with RLM(config=config, transport=transport) as rlm:
                result = await rlm.acompletion("the context", "the query")
        finally:
            tracemalloc.stop()
        assert result.response == "done" and f"{PROMPTS} {{'ok'}}" in transport.observation
        heap = transport.heap_at_sub_call
        assert len(heap) == PROMPTS
        total = PROMPTS * PROMPT_CHARS
        # All prompts are live at the first call; by the last, all but one have been freed.
        assert heap[0] - heap[-1] > 0.75 * total, (heap[0], heap[-1], total)


class TestTakePrompts:
    def test_take_moves_the_prompts_out(self) -> None:
        """The handler takes a request's prompts: it gets them all, in order, and the
        request keeps none (the sandbox, which holds the request until it replies, no
        longer holds them)."""
        request = WorkerRequest("llm_batch", ["a", "b", "c"], None)
        assert request.take_prompts() == ["a", "b", "c"]
        assert request.prompts == []
        assert request.take_prompts() == []
