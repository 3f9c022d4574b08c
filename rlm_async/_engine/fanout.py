"""The sub-calls a cell asks for: `llm_query`, `llm_batch`, `llm_batch_as_completed`,
`rlm_query`, `rlm_query_batched`; and its custom tool calls, which `tools.ToolRunner` runs.

One `FanOut` per request from a worker: every prompt is one task in the asking node's task
group — never a thread per blocked call, never a per-batch concurrency cap (the governor's
run-wide limits are the only cap). Plain sub-calls are planned for prefix caching first:
the warm-up request of each cache bucket goes alone, and the rest of its bucket waits on a
gate until it has finished, then goes in a few waves. While the warm-up is in flight, its
followers are prepared (`CallPath.prepare`: fitted, planned, journal key, the first bodies
encoded), so that their release is only admission and sending. Below `max_depth`, `rlm_*`
prompts become child RLM loops.

A model with hedging on gets a `FanoutHedger` per fan-out of plain sub-calls: its monitor
runs in the same task group, and each sub-call races its copies (`hedge.py`). A request that
streams (`llm_batch_as_completed`) hears of each slot as it is filled.

A failing slot never fails the batch: it holds an `"Error: ..."` string, and the failure is
kept in the query's state.

Admission comes before any per-prompt work: a request is measured against the calls the
budget has left, the query's deadline and the sub-calls the query may have pending at once
(`RLMConfig.max_pending_subcalls`). Prompts past what is admitted are refused in one piece,
each slot holding the same error string, counted in the query's state, never one call
record each; work over the admitted prompts yields to the event loop as it goes.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import anyio.to_thread
import structlog

from .._cache import BatchPlan
from .._config import HedgeConfig, ModelConfig
from .._gc import long_lived_frozen
from .._prompt_batch import SharedPrefixPrompts
from .._prompts import sub_system_prompt
from .._result import SubCallFailure, SubCallResult
from .._tree import Node
from .._types import Message, ModelRequest, PrefixedMessage
from ..exceptions import BudgetExceeded, SandboxError, TransportError
from ..logger import LoggedCall
from ..sandbox import OnResult, ToolCallError, WorkerRequest
from .calls import CallPath, PreparedCall
from .hedge import FanoutHedger, book_for
from .outcome import RunEnded, RunOutcome
from .state import QueryState
from .tools import ToolRunner

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["ERROR_PREFIX", "RunChild", "SubCallHandler"]

_log = structlog.get_logger("rlm_async.engine")

ERROR_PREFIX = "Error: "
_PREVIEW = 200
_CHUNK = 2_000
"""Tasks started between two checkpoints of the event loop: a batch up to this size is
in flight at once, as before; a larger one lets other tasks run while it starts."""
_OFF_LOOP = 2_000
"""Batches at least this large are planned in a worker thread, off the event loop."""
_WAVES = 8
_MIN_WAVE = 32
"""A warm-up's followers are let go in `_WAVES` waves of at least `_MIN_WAVE`, in input
order, the event loop polling between two waves. All at once, every follower opened its
connection before the loop next polled its sockets, so the first reached the server only
after all had done that work (0.2 s at 1,000, 0.9-1.3 s at 5,000 measured). Waves of 32 cut that to 0.01 s but spread the rest's arrivals over much
longer at 5,000 (more loop passes in both processes, smaller batches); eight waves keep
the first arrival within an eighth of that work at a handful of passes."""

_PREPARE_SLICE = 64
"""Followers prepared between two checkpoints of the event loop while their warm-up is in
flight: the warm-up's own steps (connecting, writing, reading) wait at most one slice."""
_AHEAD_BYTES = 2 * 2**20
"""Request bodies encoded ahead per warm-up, at most: those of the first followers to go
(about 45 at 1,000 chunks, 240 at 5,000). A body made ahead is held until it is written,
and each byte of it showed in the peak memory (8 MB ahead: 263 -> 271 MB at 5,000 chunks),
while encoding it is a few microseconds of the release (2 at 8 KB, 12 at 46 KB)."""

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
        tools: ToolRunner | None = None,
    ) -> None:
        self._engine = engine
        self._state = state
        self._calls = calls
        self._run_child = run_child
        self._node = node
        self._depth = depth
        self._observed: list[LoggedCall] | None = None
        self._tools = tools

    @property
    def node_id(self) -> str:
        return self._node.node_id

    def observe(self) -> list[LoggedCall]:
        """Keep every sub-call answered from now on (for the official log): the list
        returned fills as they finish, until `stop_observing()`."""
        self._observed = []
        return self._observed

    def stop_observing(self) -> None:
        self._observed = None

    async def __call__(self, request: WorkerRequest) -> list[str]:
        if request.op == "tool":
            if self._tools is None or request.tool is None:
                raise ToolCallError(f"there is no tool named {request.tool!r} here")
            return [await self._tools.call(request.tool, request.prompts[0])]
        config = self._engine.config
        recursive = request.op in ("rlm_query", "rlm_batch") and self._depth + 1 < config.max_depth
        sub_model = self._sub_model(request.model)
        if isinstance(sub_model, str):  # unknown model name: every slot says so
            return [ERROR_PREFIX + sub_model] * len(request.prompts)
        single = request.op in ("llm_query", "rlm_query")
        n = len(request.prompts)
        admitted, refusal = self._admit(n)
        if refusal is not None:
            self._state.refuse_unsent(sub_model.model, self._depth + 1, n - admitted, refusal)
            if single or admitted == 0:
                _log.info("sub-calls refused before any work", refused=n - admitted, why=str(refusal))
            if single and isinstance(refusal, BudgetExceeded):
                raise refusal
        prompts = request.prompts if admitted == n else request.prompts[:admitted]
        self._state.pending_subcalls += admitted
        try:
            fanout = _FanOut(
                self._engine,
                self,
                prompts,
                sub_model,
                recursive=recursive,
                on_result=request.on_result,
                hedge=hedge_config(sub_model.hedge, request.hedge),
            )
            await fanout.run()
        finally:
            self._state.pending_subcalls -= admitted
        if fanout.refused and single:
            raise fanout.refused[0]
        if refusal is None:
            return fanout.results
        return fanout.results + [f"{ERROR_PREFIX}{refusal}"] * (n - admitted)

    def _admit(self, n: int) -> tuple[int, BudgetExceeded | AdmissionRefused | None]:
        """How many of `n` prompts may start, and why the rest may not: the calls the budget
        has left (each prompt is at least one call), the deadline, and the sub-calls this
        query may have pending at once. Checked in O(1), before any per-prompt work."""
        state = self._state
        ledger = state.ledger
        left = ledger.seconds_left()
        if left is not None and left <= 0:
            cap = float(ledger.limits.max_seconds or 0)
            return 0, BudgetExceeded("seconds", cap, cap, 0.0)
        admitted = n
        why_: BudgetExceeded | AdmissionRefused | None = None
        calls = ledger.room("calls")
        if calls is not None and calls.room < admitted:
            admitted = max(calls.room, 0)
            why_ = BudgetExceeded(calls.limit, calls.cap, calls.committed, float(n - admitted))
        pending_cap = self._engine.config.max_pending_subcalls
        if pending_cap is not None and state.pending_subcalls + admitted > pending_cap:
            admitted = max(pending_cap - state.pending_subcalls, 0)
            why_ = AdmissionRefused(
                f"not sent: {n:,} sub-calls asked while {state.pending_subcalls:,} are pending, and a query "
                f"may have at most {pending_cap:,} pending at once (RLMConfig.max_pending_subcalls); "
                "send smaller batches, one after another"
            )
        return admitted, why_

    def _sub_model(self, name: str | None) -> ModelConfig | str:
        config = self._engine.config
        if name is None:
            return config.model_for_depth(self._depth + 1)
        found = config.model_named(name)
        if found is None:
            known = ", ".join(sorted(config.model_names()))
            return f"unknown model {name!r}; configured models: {known}"
        return found

    async def prepare(
        self, request: ModelRequest, model: ModelConfig, *, hedged: bool, encode: bool
    ) -> PreparedCall:
        """A plain sub-call's work that needs no admission, done ahead (`CallPath.prepare`)."""
        return await self._calls.prepare(request, model, hedged=hedged, encode=encode)

    def fail(self, why: str, *, shown_as: str = "") -> str:
        """Record a failed slot; return the text the model sees in it (`shown_as` + why)."""
        self._state.failures.append(SubCallFailure(self._node.node_id, self._depth + 1, why))
        return ERROR_PREFIX + shown_as + why

    async def plain(
        self,
        request: ModelRequest,
        model: ModelConfig,
        hedge: tuple[FanoutHedger, int] | None = None,
        prepared: PreparedCall | None = None,
    ) -> str:
        """A plain sub-call: `request`'s last message is the prompt. Read only once the call
        has ended: a shared-prefix prompt is joined for that moment, not held while the
        call is in flight."""
        started = self._engine.clock()
        completion = await self._calls.call_model(
            self._node, self._depth + 1, "sub", request, model, hedge=hedge, prepared=prepared
        )
        last = request.messages[-1]
        # The preview alone unless the whole prompt is asked for: joining a shared-prefix
        # prompt copies all of it (a 2,000-call burst's 40 MB) for 200 characters.
        self._keep(last.head(_PREVIEW), completion.text)
        if self._observed is not None:
            self._observed.append(
                LoggedCall(
                    model=model.model,
                    prompt=last.content,
                    response=completion.text,
                    execution_time=self._engine.clock() - started,
                    input_tokens=completion.usage.prompt_tokens,
                    output_tokens=completion.usage.completion_tokens,
                )
            )
        return completion.text

    async def child(self, prompt: str) -> str:
        """A child RLM over `prompt`, one level down, with its own worker."""
        depth = self._depth + 1
        started = self._engine.clock()
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
        self._keep(prompt[:_PREVIEW], outcome.answer)
        if self._observed is not None:
            model = self._engine.config.model_for_depth(depth).model
            elapsed = self._engine.clock() - started
            self._observed.append(
                LoggedCall(model=model, prompt=prompt, response=outcome.answer, execution_time=elapsed)
            )
        return outcome.answer

    def _keep(self, preview: str, answer: str) -> None:
        self._state.subcall_results.append(
            SubCallResult(self._node.node_id, self._depth + 1, preview, answer)
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
        on_result: OnResult | None = None,
        hedge: HedgeConfig | None = None,
    ) -> None:
        self._engine = engine
        self._handler = handler
        self._prompts = prompts
        self._model = model
        self._recursive = recursive
        self.results: list[str] = [""] * len(prompts)
        self.refused: list[BudgetExceeded] = []
        self._plan: BatchPlan | None = None
        self._gates: dict[int, _Waves] = {}
        self._on_result = on_result
        self._hedge = hedge
        self._hedger: FanoutHedger | None = None
        self._prepared: list[PreparedCall | None] = []
        """Followers' calls prepared while their warm-up is in flight, by index."""
        self._preconnecting = anyio.CancelScope()
        """Opening the followers' connections (`_preconnect`), until a warm-up ends."""
        self._preconnected: anyio.Event | None = None
        """Set when `_preconnect`, once begun, has ended: its connections are in the pool."""

    async def run(self) -> None:
        n = len(self._prompts)
        if not self._recursive:
            settings = await self._engine.server_settings(self._model)
            to_requests = functools.partial(_sub_requests, system=self._engine.config.official_prompt is None)
            plan = self._engine.planner(self._prompts, self._model, to_requests, settings.cache)
            # Work proportional to the batch runs off the event loop when the batch is large.
            self._plan = await anyio.to_thread.run_sync(plan) if n >= _OFF_LOOP else plan()
            self._engine.announce_plan(self._plan)
            self._gates = _waves(self._plan)
            if self._hedge is not None and self._prompts:
                self._hedger = FanoutHedger(
                    self._hedge,
                    book_for(self._engine.governor),
                    model=self._model.model,
                    total=n,
                    clock=self._engine.clock,
                )
        with long_lived_frozen(n):
            async with anyio.create_task_group() as tg:
                if self._hedger is not None:
                    tg.start_soon(self._hedger.monitor)
                for i in range(n):
                    tg.start_soon(self._gated, i)
                    if i % _CHUNK == _CHUNK - 1:
                        await anyio.lowlevel.checkpoint()
                if self._gates:
                    self._prepared = [None] * n
                    for gate in self._gates.values():
                        tg.start_soon(self._prepare_followers, gate)
                    tg.start_soon(self._preconnect)

    async def _preconnect(self) -> None:
        """While the warm-up is in flight, open the connections its followers will take, so
        that their release is sending, not handshakes; stopped when a warm-up ends (the
        followers then open whatever is still missing themselves)."""
        followers = sum(len(gate.followers) for gate in self._gates.values())
        self._preconnected = ended = anyio.Event()
        try:
            with self._preconnecting:  # cancelled before it was entered (a warm-up ended first): at once
                await self._engine.transport_for(self._model).preconnect(followers)
        finally:
            ended.set()

    async def _prepare_followers(self, gate: _Waves) -> None:
        """While a warm-up is in flight, prepare its followers a slice at a time, until the
        gate opens (those not reached by then are prepared when they go). A follower whose
        preparation fails is left to fail the same way when it is made, and recorded then."""
        plan = self._plan
        assert plan is not None
        hedged = self._hedger is not None
        ahead = _AHEAD_BYTES
        for k, i in enumerate(gate.followers):
            if k % _PREPARE_SLICE == 0:
                await anyio.lowlevel.checkpoint()
            if gate.released:
                return
            try:
                prepared = await self._handler.prepare(
                    plan.requests[i], self._model, hedged=hedged, encode=ahead > 0
                )
            except Exception:  # raised again, and recorded, when the call is made
                continue
            if prepared.encoded is not None:
                ahead -= prepared.encoded.size
            self._prepared[i] = prepared

    async def _gated(self, i: int) -> None:
        plan = self._plan
        gate = plan.gate(i) if plan is not None else None
        if gate is not None:
            await self._gates[gate].wait(i)
        try:
            await self._one(i)
            if self._on_result is not None:
                await self._on_result(i, self.results[i])
        finally:
            if self._hedger is not None:
                self._hedger.finish(i)
            if i in self._gates:  # a failed warm-up releases its bucket too: the rest go cold
                assert plan is not None
                self._preconnecting.cancel()
                self._engine.mark_warm(plan.buckets[plan.bucket_of[i]])
                # Shielded: the followers must not stay gated if this task is cancelled
                # while it releases them (they are then cancelled with it, or go on).
                with anyio.CancelScope(shield=True):
                    if self._preconnected is not None and not self._preconnected.is_set():
                        # The connections opened so far go to the pool as the cancelled
                        # `_preconnect` ends; released before that, the followers would
                        # open their own beside them. (Not begun yet: it will end at once.)
                        await self._preconnected.wait()
                    await self._gates[i].release()

    async def _one(self, i: int) -> None:
        try:
            if self._plan is None:
                self.results[i] = await self._handler.child(self._prompts[i])
            else:
                hedge = None if self._hedger is None else (self._hedger, i)
                prepared = None
                if self._prepared:
                    prepared, self._prepared[i] = self._prepared[i], None
                self.results[i] = await self._handler.plain(
                    self._plan.requests[i], self._model, hedge, prepared
                )
        except BudgetExceeded as exc:
            self.refused.append(exc)
            self.results[i] = f"{ERROR_PREFIX}{exc}"
        except TransportError as exc:
            self.results[i] = self._handler.fail(str(exc))
        except Exception as exc:  # a bug below us must cost one slot, not the whole query
            _log.exception("sub-call failed unexpectedly", node_id=self._handler.node_id)
            self.results[i] = self._handler.fail(f"{type(exc).__name__}: {exc}", shown_as="internal error: ")


class _Waves:
    """The gate of one warm-up's followers (`followers`, in input order): they wait on it,
    and are let through a wave at a time, with a pass through the event loop between two
    waves (see `_WAVES`)."""

    def __init__(self, followers: Sequence[int]) -> None:
        self.followers = followers
        self.released = False
        """The warm-up has ended: its followers go (or are going)."""
        size = max(_MIN_WAVE, -(-len(followers) // _WAVES))
        self._waves: list[anyio.Event] = []
        self._of: dict[int, anyio.Event] = {}
        for k, index in enumerate(followers):
            if k % size == 0:
                self._waves.append(anyio.Event())
            self._of[index] = self._waves[-1]

    async def wait(self, index: int) -> None:
        await self._of[index].wait()

    async def release(self) -> None:
        self.released = True
        for n, wave in enumerate(self._waves):
            if n:
                await anyio.lowlevel.checkpoint()
            wave.set()


def _waves(plan: BatchPlan) -> dict[int, _Waves]:
    """The gate of each warm-up of `plan`."""
    followers: dict[int, list[int]] = {w: [] for w in plan.warmups}
    if followers:
        for i in range(plan.batch_size):
            gate = plan.gate(i)
            if gate is not None:
                followers[gate].append(i)
    return {w: _Waves(f) for w, f in followers.items()}


def hedge_config(model: HedgeConfig, asked: bool | None) -> HedgeConfig | None:
    """The hedging a request gets: the model's, unless the code passed `hedge=`
    (`False`: none; `True`: the model's settings, turned on). `None`: no hedging."""
    if asked is False or (asked is None and not model.enabled):
        return None
    return model if model.enabled else replace(model, enabled=True)


class AdmissionRefused(Exception):
    """Prompts of a request that were not admitted (too many sub-calls pending)."""


def _sub_requests(prompts: Sequence[str], model: ModelConfig, *, system: bool = True) -> list[ModelRequest]:
    """`system`: rlm_async's sub-call system prompt first; without it, the prompt alone as
    one user message, as the official package sends its plain sub-calls. Prompts that
    share a prefix keep it shared in their messages."""
    if isinstance(prompts, SharedPrefixPrompts):
        prefix = prompts.prefix
        return [
            _sub_request(PrefixedMessage("user", prefix, rest), model, system=system)
            for rest in prompts.rests
        ]
    return [_sub_request(Message("user", p), model, system=system) for p in prompts]


def _sub_request(user: Message, model: ModelConfig, *, system: bool = True) -> ModelRequest:
    return ModelRequest(
        model=model.model,
        messages=(Message("system", sub_system_prompt()), user) if system else (user,),
        max_tokens=model.max_tokens,
        temperature=model.temperature,
        sampling=model.sampling or None,
    )
