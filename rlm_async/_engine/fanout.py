"""The sub-calls a cell asks for: `llm_query`, `llm_batch`, `rlm_query`, `rlm_query_batched`.

One `FanOut` per request from a worker: every prompt is one task in the asking node's task
group — never a thread per blocked call, never a per-batch concurrency cap (the governor's
run-wide limits are the only cap). Plain sub-calls are planned for prefix caching first:
the warm-up request of each cache bucket goes alone, and the rest of its bucket waits on a
gate until it has finished. Below `max_depth`, `rlm_*` prompts become child RLM loops.

A failing slot never fails the batch: it holds an `"Error: ..."` string, and the failure is
kept in the query's state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import anyio
import structlog

from .._cache import BatchPlan
from .._config import ModelConfig
from .._gc import long_lived_frozen
from .._prompts import sub_system_prompt
from .._result import SubCallFailure, SubCallResult
from .._tree import Node
from .._types import Message, ModelRequest
from ..exceptions import BudgetExceeded, SandboxError, TransportError
from ..sandbox import WorkerRequest
from .calls import CallPath
from .outcome import RunEnded, RunOutcome
from .state import QueryState

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["ERROR_PREFIX", "RunChild", "SubCallHandler"]

_log = structlog.get_logger("rlm_async.engine")

ERROR_PREFIX = "Error: "
_PREVIEW = 200

RunChild = Callable[[str, int, Node], Awaitable[RunOutcome]]
"""Runs a child RLM loop over a prompt at a depth, under a parent node."""


class SubCallHandler:
    """Answers one RLM node's sub-call requests; the worker calls it once per request."""

    def __init__(
        self,
        engine: Engine,
        state: QueryState,
        calls: CallPath,
        run_child: RunChild,
        *,
        node: Node,
        depth: int,
    ) -> None:
        self._engine = engine
        self._state = state
        self._calls = calls
        self._run_child = run_child
        self._node = node
        self._depth = depth

    @property
    def node_id(self) -> str:
        return self._node.node_id

    async def __call__(self, request: WorkerRequest) -> list[str]:
        config = self._engine.config
        recursive = request.op in ("rlm_query", "rlm_batch") and self._depth + 1 < config.max_depth
        sub_model = self._sub_model(request.model)
        if isinstance(sub_model, str):  # unknown model name: every slot says so
            return [ERROR_PREFIX + sub_model] * len(request.prompts)
        fanout = _FanOut(self._engine, self, request.prompts, sub_model, recursive=recursive)
        await fanout.run()
        if fanout.refused and request.op in ("llm_query", "rlm_query"):
            raise fanout.refused[0]
        return fanout.results

    def _sub_model(self, name: str | None) -> ModelConfig | str:
        config = self._engine.config
        if name is None:
            return config.model_for_depth(self._depth + 1)
        found = config.model_named(name)
        if found is None:
            known = ", ".join(sorted(config.model_names()))
            return f"unknown model {name!r}; configured models: {known}"
        return found

    def fail(self, why: str, *, shown_as: str = "") -> str:
        """Record a failed slot; return the text the model sees in it (`shown_as` + why)."""
        self._state.failures.append(SubCallFailure(self._node.node_id, self._depth + 1, why))
        return ERROR_PREFIX + shown_as + why

    async def plain(self, prompt: str, request: ModelRequest, model: ModelConfig) -> str:
        completion = await self._calls.call_model(self._node, self._depth + 1, "sub", request, model)
        self._keep(prompt, completion.text)
        return completion.text

    async def child(self, prompt: str) -> str:
        """A child RLM over `prompt`, one level down, with its own worker."""
        depth = self._depth + 1
        try:
            outcome = await self._run_child(prompt, depth, self._node)
        except RunEnded as ended:
            # A child whose own model call failed ends that child only: its slot says why,
            # like a failed plain sub-call. Left to propagate, it would tear down the parent's
            # cell and reach the caller as an ExceptionGroup.
            return self.fail(str(ended.outcome.detail), shown_as="child RLM failed: ")
        except SandboxError as exc:  # the child's worker could not start
            return self.fail(f"{type(exc).__name__}: {exc}", shown_as="child RLM failed: ")
        if outcome.status == "budget_exceeded" and outcome.answer is None:
            last = self._state.ledger.last_refusal
            if last is not None:  # a copy: the same exception object must not be raised in two tasks
                raise BudgetExceeded(last.limit, last.cap, last.committed, last.requested)
        if outcome.answer is None:
            return self.fail(f"child RLM ended without an answer ({outcome.status}: {outcome.detail})")
        self._keep(prompt, outcome.answer)
        return outcome.answer

    def _keep(self, prompt: str, answer: str) -> None:
        self._state.subcall_results.append(
            SubCallResult(self._node.node_id, self._depth + 1, prompt[:_PREVIEW], answer)
        )


class _FanOut:
    """One request's prompts, run as one task each; slots filled in input order."""

    def __init__(
        self,
        engine: Engine,
        handler: SubCallHandler,
        prompts: Sequence[str],
        model: ModelConfig,
        *,
        recursive: bool,
    ) -> None:
        self._engine = engine
        self._handler = handler
        self._prompts = prompts
        self._model = model
        self._recursive = recursive
        self.results: list[str] = [""] * len(prompts)
        self.refused: list[BudgetExceeded] = []
        self._plan: BatchPlan | None = None
        self._gates: dict[int, anyio.Event] = {}

    async def run(self) -> None:
        if not self._recursive:
            settings = await self._engine.server_settings(self._model)
            self._plan = self._engine.plan_batch(
                [_sub_request(p, self._model) for p in self._prompts], settings.cache
            )
            self._gates = {w: anyio.Event() for w in self._plan.warmups}
        with long_lived_frozen(len(self._prompts)):
            async with anyio.create_task_group() as tg:
                for i in range(len(self._prompts)):
                    tg.start_soon(self._gated, i)

    async def _gated(self, i: int) -> None:
        plan = self._plan
        gate = plan.gate(i) if plan is not None else None
        if gate is not None:
            await self._gates[gate].wait()
        try:
            await self._one(i)
        finally:
            if i in self._gates:  # a failed warm-up releases its bucket too: the rest go cold
                assert plan is not None
                self._gates[i].set()
                self._engine.mark_warm(plan.buckets[plan.bucket_of[i]])

    async def _one(self, i: int) -> None:
        prompt = self._prompts[i]
        try:
            if self._plan is None:
                self.results[i] = await self._handler.child(prompt)
            else:
                self.results[i] = await self._handler.plain(prompt, self._plan.requests[i], self._model)
        except BudgetExceeded as exc:
            self.refused.append(exc)
            self.results[i] = f"{ERROR_PREFIX}{exc}"
        except TransportError as exc:
            self.results[i] = self._handler.fail(str(exc))
        except Exception as exc:  # a bug below us must cost one slot, not the whole query
            _log.exception("sub-call failed unexpectedly", node_id=self._handler.node_id)
            self.results[i] = self._handler.fail(f"{type(exc).__name__}: {exc}", shown_as="internal error: ")


def _sub_request(prompt: str, model: ModelConfig) -> ModelRequest:
    return ModelRequest(
        model=model.model,
        messages=(Message("system", sub_system_prompt()), Message("user", prompt)),
        max_tokens=model.max_tokens,
        temperature=model.temperature,
    )
