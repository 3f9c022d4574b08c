"""The RLM loop: generate -> extract code -> execute -> observe -> answer, as an async task tree.

One `Query` per `acompletion`. Its root RLM node runs the loop against a REPL worker; code
in the worker asks for sub-calls over the worker's control channel, and each prompt of a
fan-out becomes one task in the asking node's task group — never a thread per blocked
call, never a per-batch concurrency cap (the governor's run-wide limits are the only cap).
A child RLM (`rlm_query` below `max_depth`) is the same loop, one level down, with its own
worker; its task group nests in its parent's, so cancelling a node cancels its subtree and
the `finally` clauses (shielded) kill every worker in it.

Every model call of the tree passes through `Query.call_model`: the one place where the
journal, the governor (limits, retries, budget) and the call records meet.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import anyio
import structlog

from . import _events
from ._cache import BatchPlan, plan_batch
from ._config import ModelConfig, RLMConfig
from ._context import Context
from ._governor import BudgetLedger, Governor
from ._journal import Journal
from ._parsing import find_code_blocks, find_final, truncate_output
from ._prompts import describe_context, first_user_message, root_system_prompt, sub_system_prompt
from ._result import RLMResult, RunStatus, SubCallFailure, SubCallResult, UsageTotals
from ._tree import CallTree, Node
from ._types import CallKind, CallRecord, CallStatus, Completion, Message, ModelRequest, Usage
from .exceptions import BudgetExceeded, ConfigError, FatalError, RetryableError, SandboxError, TransportError
from .sandbox import CellResult, Worker, WorkerRequest, start_worker
from .transport import Transport

__all__ = ["Engine", "Query"]

_log = structlog.get_logger("rlm_async.engine")

_ERROR_PREFIX = "Error: "
_PREVIEW = 200
_FINAL_MAX_TOKENS = 512
_NO_USAGE = Usage()
# Providers keep a cached prefix for minutes after its last use (OpenAI: 5-10 min idle).
_WARM_TTL_S = 300.0


class _RunEnded(Exception):
    """A root call of an RLM node could not be made (budget, fatal transport error)."""

    def __init__(self, status: RunStatus, detail: str, limit: str | None = None) -> None:
        super().__init__(detail)
        self.status: RunStatus = status
        self.detail = detail
        self.limit = limit


class Engine:
    """Holds what queries share: configuration, transports (connection pools), the
    governor (run-wide limits), the journal. One per `RLM` instance."""

    def __init__(
        self,
        config: RLMConfig,
        *,
        transport_factory: Callable[[ModelConfig], Transport],
        governor: Governor,
        journal: Journal | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.governor = governor
        self.journal = journal
        self.clock = clock
        self._transport_factory = transport_factory
        self._transports: dict[tuple[str, str | None], Transport] = {}
        self._warm_buckets: dict[str, float] = {}

    def plan_batch(self, requests: list[ModelRequest], model: ModelConfig) -> BatchPlan:
        """Plan a fan-out for prefix caching, remembering which cache buckets are warm."""
        now = self.clock()
        warm = {b for b, t in self._warm_buckets.items() if now - t < _WARM_TTL_S}
        plan = plan_batch(requests, model.cache_settings(), already_warm=warm)
        if len(requests) > 1:
            _events.emit("warmup.decision", **plan.event_fields())
        return plan

    def mark_warm(self, bucket: str) -> None:
        self._warm_buckets[bucket] = self.clock()

    def transport_for(self, model: ModelConfig) -> Transport:
        key = (model.base_url, model.api_key_env)
        transport = self._transports.get(key)
        if transport is None:
            transport = self._transports[key] = self._transport_factory(model)
        return transport

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            for transport in self._transports.values():
                await transport.aclose()
            self._transports.clear()

    async def run(
        self,
        context: Context,
        root_prompt: str | None,
        *,
        sinks: tuple[_events.EventSink, ...] = (),
        query_id: str = "q1",
    ) -> RLMResult:
        query = Query(self, query_id=query_id)
        query.check_prices()
        kept: list[_events.Event] = []
        if self.config.keep_events:
            sinks = (*sinks, kept.append)
        with _events.sinks(*sinks, clock=self.clock), _events.bind(query_id=query_id):
            result = await query.run(context, root_prompt)
        result.events = kept
        return result


class Query:
    """The state of one query: its tree, ledger, call records; survives cancellation so a
    partial result can always be assembled."""

    def __init__(self, engine: Engine, *, query_id: str) -> None:
        self.engine = engine
        self.config = engine.config
        self.query_id = query_id
        self.tree = CallTree(engine.clock)
        self.ledger: BudgetLedger = engine.governor.ledger(self.config.budget)
        self.records: list[CallRecord] = []
        self.failures: list[SubCallFailure] = []
        self.subcall_results: list[SubCallResult] = []
        self.iterations = 0
        self._call_ids = 0

    def check_prices(self) -> None:
        """A dollar cap needs a price for every model the tree may call. Refused here, before
        any work: found later by the governor inside a fan-out, the same ConfigError would
        reach the caller wrapped in an ExceptionGroup from the sub-call task group."""
        if not self.ledger.caps_usd:
            return
        prices = self.engine.governor.prices
        models = self.config.all_models()
        unpriced = sorted({m.model for m in models if not prices.is_priced(m.model, m.prices)})
        if unpriced:
            raise ConfigError(
                f"a dollar budget is set but no price is known for model(s) {unpriced}, so it could not "
                "be enforced: give each a ModelPrice (ModelPrice.free() for a self-hosted model)"
            )

    # ------------------------------------------------------------------ the query
    async def run(self, context: Context, root_prompt: str | None) -> RLMResult:
        started = self.engine.clock()
        meta = describe_context(context)
        _events.emit(
            "query.start",
            context_type=meta.type_name,
            context_chars=meta.total_length,
            root_prompt_chars=len(root_prompt or ""),
            max_depth=self.config.max_depth,
            budget_usd=self.config.budget.max_usd,
        )
        status: RunStatus = "ok"
        detail: str | None = None
        limit: str | None = None
        answer: str | None = None
        deadline = self.config.budget.max_seconds
        with anyio.move_on_after(math.inf if deadline is None else deadline) as scope:
            try:
                answer, status, detail, limit = await self.run_rlm(context, root_prompt, depth=0, parent=None)
            except _RunEnded as ended:
                status, detail, limit = ended.status, ended.detail, ended.limit
            except anyio.get_cancelled_exc_class():
                if not scope.cancel_called:  # cancelled from outside: say so, then let it propagate
                    _events.emit("query.finish", status="cancelled", wall_s=self.engine.clock() - started)
                raise
        if scope.cancelled_caught:
            status, limit = "timeout", "seconds"
            detail = f"deadline of {deadline:g} s reached; the run was cancelled and its workers killed"
        refused = [r for r in self.records if r.status == "budget"]
        if status in ("ok", "max_iterations") and refused:
            # The model answered, but without some sub-calls it asked for: never a silent "ok".
            last = self.ledger.last_refusal
            status, limit = "budget_exceeded", last.limit if last is not None else None
            detail = (
                f"{len(refused)} call(s) were refused by the budget"
                + (f" ({last})" if last is not None else "")
                + "; the model answered without their results, so the answer may be incomplete"
            )
        result = self._result(answer, status, detail, limit, self.engine.clock() - started, root_prompt)
        _events.emit(
            "query.finish",
            status=status,
            wall_s=result.execution_time,
            calls=result.total.calls,
            prompt_tokens=result.total.prompt_tokens,
            cached_tokens=result.total.cached_tokens,
            completion_tokens=result.total.completion_tokens,
            cost_usd=result.total.cost_usd,
        )
        return result

    def _result(
        self,
        answer: str | None,
        status: RunStatus,
        detail: str | None,
        limit: str | None,
        wall: float,
        root_prompt: str | None,
    ) -> RLMResult:
        by_model: dict[str, UsageTotals] = {}
        by_depth: dict[int, UsageTotals] = {}
        total = UsageTotals()
        for r in self.records:
            by_model.setdefault(r.model, UsageTotals()).add(r)
            by_depth.setdefault(r.depth, UsageTotals()).add(r)
            total.add(r)
        return RLMResult(
            response=answer,
            status=status,
            detail=detail,
            root_model=self.config.model_for_depth(0).model,
            prompt=root_prompt,
            execution_time=wall,
            iterations=self.iterations,
            calls=list(self.records),
            nodes=[n.to_dict() for n in self.tree.nodes.values()],
            failures=list(self.failures),
            subcall_results=list(self.subcall_results),
            by_model=by_model,
            by_depth=by_depth,
            total=total,
            limit_hit=limit,
        )

    # ------------------------------------------------------------------ one RLM node
    async def run_rlm(
        self, context: Context, root_prompt: str | None, *, depth: int, parent: Node | None
    ) -> tuple[str | None, RunStatus, str | None, str | None]:
        """Run one RLM loop to its end. Returns (answer, status, detail, limit)."""
        model = self.config.model_for_depth(depth)
        node = self.tree.open(parent=parent, depth=depth, kind="rlm", model=model.model, label="rlm")
        worker: Worker | None = None
        try:
            with _events.bind(node_id=node.node_id, depth=depth):
                worker = await start_worker(context, self.config.sandbox)
                outcome = await self._loop(node, worker, context, root_prompt, depth, model)
            self.tree.close(node, "ok" if outcome[1] == "ok" else "error", outcome[2])
            return outcome
        except _RunEnded as ended:
            self.tree.close(node, "budget" if ended.status == "budget_exceeded" else "error", ended.detail)
            raise
        except anyio.get_cancelled_exc_class():
            self.tree.close(node, "cancelled")
            raise
        except BaseException as exc:
            self.tree.close(node, "error", f"{type(exc).__name__}: {exc}")
            raise
        finally:
            if worker is not None:
                with anyio.CancelScope(shield=True):
                    await worker.aclose()

    async def _loop(
        self,
        node: Node,
        worker: Worker,
        context: Context,
        root_prompt: str | None,
        depth: int,
        model: ModelConfig,
    ) -> tuple[str | None, RunStatus, str | None, str | None]:
        system = self.config.system_prompt or root_system_prompt()
        messages: list[Message] = [
            Message("system", system),
            Message("user", first_user_message(describe_context(context), root_prompt)),
        ]
        on_request = self._request_handler(node, depth)
        for iteration in range(1, self.config.max_iterations + 1):
            if depth == 0:
                self.iterations = iteration
            it_started = self.engine.clock()
            _events.emit("iteration.start", iteration=iteration)
            try:
                # "child": the turn of a child RLM (see CallKind), so hooks and traces tell them apart.
                kind: CallKind = "root" if depth == 0 else "child"
                try:
                    reply = await self._root_turn(node, model, depth, messages, kind=kind)
                except BudgetExceeded as exc:
                    note = (
                        f"The budget is exhausted ({exc.limit} cap {exc.cap:g}). Give your best final answer "
                        "now, from what you know, on a line of its own: FINAL(your answer)."
                    )
                    try:
                        answer = await self._final_call(node, worker, model, depth, messages, note)
                    except BudgetExceeded:
                        answer = None
                    return answer, "budget_exceeded", str(exc), exc.limit
                messages.append(Message("assistant", reply))
                answer, observation = await self._execute_reply(node, worker, reply, iteration, on_request)
            finally:
                _events.emit(
                    "iteration.finish", iteration=iteration, duration_s=self.engine.clock() - it_started
                )
            if answer is not None:
                return answer, "ok", None, None
            messages.append(Message("user", self._feedback(observation, iteration)))
        # Out of iterations: one last call asks for the best answer from what is known.
        note = (
            f"You have used all {self.config.max_iterations} iterations. Give your best final answer "
            "now, from what you know, on a line of its own: FINAL(your answer)."
        )
        detail = f"max_iterations ({self.config.max_iterations}) reached; the answer comes from a final call"
        try:
            answer = await self._final_call(node, worker, model, depth, messages, note)
        except BudgetExceeded as exc:
            return None, "budget_exceeded", f"{detail}, which the budget refused: {exc}", exc.limit
        return answer, "max_iterations", detail, None

    async def _final_call(
        self,
        node: Node,
        worker: Worker,
        model: ModelConfig,
        depth: int,
        messages: list[Message],
        note: str,
    ) -> str | None:
        """One last root call that asks for the answer. Its output cap is small, so that it
        still fits a budget that refused a full turn."""
        final_model = dataclasses.replace(
            model, max_tokens=min(model.max_tokens or _FINAL_MAX_TOKENS, _FINAL_MAX_TOKENS)
        )
        reply = await self._root_turn(
            node, final_model, depth, [*messages, Message("user", note)], kind="final"
        )
        marker = find_final(reply)
        if marker is None:
            return reply.strip() or None
        if marker.kind == "var":
            return await worker.get_variable(marker.value)
        return marker.value

    async def _root_turn(
        self, node: Node, model: ModelConfig, depth: int, messages: list[Message], *, kind: CallKind
    ) -> str:
        request = ModelRequest(
            model=model.model,
            messages=tuple(messages),
            max_tokens=model.max_tokens,
            temperature=model.temperature,
        )
        try:
            completion = await self.call_model(node, depth, kind, request, model)
        except (FatalError, RetryableError) as exc:
            raise _RunEnded("error", f"root model call failed: {exc}") from exc
        return completion.text

    async def _execute_reply(
        self,
        node: Node,
        worker: Worker,
        reply: str,
        iteration: int,
        on_request: Callable[[WorkerRequest], Any],
    ) -> tuple[str | None, str]:
        """Run every ```repl block of a reply in order. Returns (answer or None, observation)."""
        blocks = find_code_blocks(reply)
        parts: list[str] = []
        limit = self.config.output_limit_chars
        for index, code in enumerate(blocks, start=1):
            _events.emit("cell.start", iteration=iteration, cell=index)
            result = await worker.run_cell(code, on_request)
            _events.emit(
                "cell.finish",
                iteration=iteration,
                cell=index,
                duration_s=result.duration_s,
                status=result.status,
                stdout_chars=len(result.stdout),
                stderr_chars=len(result.stderr),
                error=result.error,
            )
            parts.append(truncate_output(_cell_text(index, len(blocks), result), limit))
            if result.worker_dead:
                await worker.restart()
                parts.append(
                    f"[the REPL worker was killed ({result.status}) and a fresh one started: `context` is "
                    "reloaded, but every variable you created is gone]"
                )
            if result.final_answer is not None:
                return result.final_answer, "\n\n".join(parts)
        marker = find_final(reply)
        if marker is not None:
            if marker.kind == "text":
                return marker.value, "\n\n".join(parts)
            value = await worker.get_variable(marker.value)
            if value is not None:
                return value, "\n\n".join(parts)
            parts.append(
                f"FINAL_VAR({marker.value}): no variable named {marker.value!r} exists. "
                "Assign it in a ```repl block first."
            )
        if not blocks and marker is None:
            parts.append(
                "Your reply had no ```repl block and no FINAL(...) line. Write Python in a ```repl block "
                "to work with `context`, or give your answer as FINAL(...)."
            )
        return None, "\n\n".join(parts)

    def _feedback(self, observation: str, iteration: int) -> str:
        left = self.config.max_iterations - iteration
        budget = self.ledger.describe_remaining()
        lines = [observation, "", f"[iteration {iteration} of {self.config.max_iterations}; {left} left]"]
        if budget:
            lines.append(f"[budget left: {budget}]")
        return "\n".join(lines)

    # ------------------------------------------------------------------ sub-calls
    def _request_handler(self, node: Node, depth: int) -> Callable[[WorkerRequest], Any]:
        async def on_request(request: WorkerRequest) -> list[str]:
            recursive = request.op in ("rlm_query", "rlm_batch") and depth + 1 < self.config.max_depth
            results: list[str] = [""] * len(request.prompts)
            refused: list[BudgetExceeded] = []
            sub_model = self._sub_model(request.model, depth + 1)
            if isinstance(sub_model, str):  # unknown model name: every slot says so
                return [_ERROR_PREFIX + sub_model] * len(request.prompts)

            async def one(i: int, prompt: str, req: ModelRequest | None) -> None:
                try:
                    if recursive:
                        results[i] = await self._child(node, depth + 1, prompt)
                    else:
                        assert req is not None
                        completion = await self.call_model(node, depth + 1, "sub", req, sub_model)
                        results[i] = completion.text
                        self.subcall_results.append(
                            SubCallResult(node.node_id, depth + 1, prompt[:_PREVIEW], completion.text)
                        )
                except BudgetExceeded as exc:
                    refused.append(exc)
                    results[i] = f"{_ERROR_PREFIX}{exc}"
                except TransportError as exc:
                    results[i] = f"{_ERROR_PREFIX}{exc}"
                    self.failures.append(SubCallFailure(node.node_id, depth + 1, str(exc)))
                except Exception as exc:  # a bug below us must cost one slot, not the whole query
                    _log.exception("sub-call failed unexpectedly", node_id=node.node_id)
                    results[i] = f"{_ERROR_PREFIX}internal error: {type(exc).__name__}: {exc}"
                    self.failures.append(
                        SubCallFailure(node.node_id, depth + 1, f"{type(exc).__name__}: {exc}")
                    )

            requests: list[ModelRequest | None] = [None] * len(request.prompts)
            gates: dict[int, anyio.Event] = {}
            plan = None
            if not recursive:
                plan = self.engine.plan_batch(
                    [self._sub_request(p, sub_model) for p in request.prompts], sub_model
                )
                requests = list(plan.requests)
                gates = {w: anyio.Event() for w in plan.warmups}

            async def gated(i: int) -> None:
                gate = plan.gate(i) if plan is not None else None
                if gate is not None:
                    await gates[gate].wait()
                try:
                    await one(i, request.prompts[i], requests[i])
                finally:
                    if i in gates:  # a failed warm-up releases its bucket too: the rest go cold
                        gates[i].set()
                        assert plan is not None
                        self.engine.mark_warm(plan.buckets[plan.bucket_of[i]])

            async with anyio.create_task_group() as tg:
                for i in range(len(request.prompts)):
                    tg.start_soon(gated, i)
            if refused and request.op in ("llm_query", "rlm_query"):
                raise refused[0]
            return results

        return on_request

    def _sub_model(self, name: str | None, depth: int) -> ModelConfig | str:
        if name is None:
            return self.config.model_for_depth(depth)
        found = self.config.model_named(name)
        if found is None:
            known = ", ".join(sorted(self.config.model_names()))
            return f"unknown model {name!r}; configured models: {known}"
        return found

    def _sub_request(self, prompt: str, model: ModelConfig) -> ModelRequest:
        return ModelRequest(
            model=model.model,
            messages=(Message("system", sub_system_prompt()), Message("user", prompt)),
            max_tokens=model.max_tokens,
            temperature=model.temperature,
        )

    async def _child(self, parent: Node, depth: int, prompt: str) -> str:
        try:
            answer, status, detail, _limit = await self.run_rlm(prompt, None, depth=depth, parent=parent)
        except (_RunEnded, SandboxError) as exc:
            # A child whose own model call failed (or whose worker could not start) ends that
            # child only: its slot says why, like a failed plain sub-call. Left to propagate,
            # it would tear down the parent's cell and reach the caller as an ExceptionGroup.
            why = exc.detail if isinstance(exc, _RunEnded) else f"{type(exc).__name__}: {exc}"
            self.failures.append(SubCallFailure(parent.node_id, depth, why))
            return f"{_ERROR_PREFIX}child RLM failed: {why}"
        if status == "budget_exceeded" and answer is None:
            last = self.ledger.last_refusal
            if last is not None:  # a copy: the same exception object must not be raised in two tasks
                raise BudgetExceeded(last.limit, last.cap, last.committed, last.requested)
        if answer is None:
            error = f"child RLM ended without an answer ({status}: {detail})"
            self.failures.append(SubCallFailure(parent.node_id, depth, error))
            return _ERROR_PREFIX + error
        self.subcall_results.append(SubCallResult(parent.node_id, depth, prompt[:_PREVIEW], answer))
        return answer

    # ------------------------------------------------------------------ the choke point
    async def call_model(
        self, parent: Node, depth: int, kind: CallKind, request: ModelRequest, model: ModelConfig
    ) -> Completion:
        """Every model call of the tree passes here: journal, governor, records, events."""
        node = self.tree.open(parent=parent, depth=depth, kind="llm", model=request.model, label=kind)
        self._call_ids += 1
        call_id = f"c{self._call_ids}"
        transport = self.engine.transport_for(model)
        started = self.engine.clock()
        with _events.bind(node_id=node.node_id, depth=depth):
            _events.emit(
                "call.start",
                call_id=call_id,
                parent_id=parent.node_id,
                call_kind=kind,
                model=request.model,
                prompt_chars=request.prompt_chars(),
                # Prompt text may hold private data: only with log_text=True.
                **({"prompt": request.messages[-1].content} if self.config.log_text else {}),
            )
            attempts, cost, from_journal = 0, 0.0, False
            try:
                journal = self.engine.journal

                async def send() -> Completion:
                    nonlocal attempts, cost
                    governed = await self.engine.governor.call(
                        request,
                        transport,
                        ledger=self.ledger,
                        depth=depth,
                        price=model.prices,
                        limits=model.limits,
                    )
                    attempts, cost = governed.attempts, governed.cost_usd
                    return governed.completion

                if journal is not None:
                    # Every call goes through the journal: reusable ones are looked up (and
                    # identical ones in flight sent once); all are recorded for a later resume.
                    completion, from_journal = await journal.call(request, send, call_id=call_id)
                else:
                    completion = await send()
            except BaseException as exc:
                self._finish_call(
                    node,
                    call_id,
                    kind,
                    request,
                    started,
                    _status_of(exc),
                    attempts=max(attempts, getattr(exc, "attempts", 1)),
                    error=f"{type(exc).__name__}: {exc}",
                )
                raise
            self._finish_call(
                node,
                call_id,
                kind,
                request,
                started,
                "ok",
                # A journal hit consumed no tokens: its usage belongs to the call that paid.
                usage=Usage() if from_journal else completion.usage,
                cost=0.0 if from_journal else cost,
                attempts=0 if from_journal else attempts,
                from_journal=from_journal,
                text=completion.text,
            )
        return completion

    def _finish_call(
        self,
        node: Node,
        call_id: str,
        kind: CallKind,
        request: ModelRequest,
        started: float,
        status: CallStatus,
        *,
        usage: Usage = _NO_USAGE,
        cost: float = 0.0,
        attempts: int,
        from_journal: bool = False,
        error: str | None = None,
        text: str | None = None,
    ) -> None:
        """Record a finished call (paid, failed, refused or cancelled): nothing is lost."""
        assert node.parent_id is not None
        record = CallRecord(
            call_id=call_id,
            node_id=node.node_id,
            parent_id=node.parent_id,
            depth=node.depth,
            kind=kind,
            model=request.model,
            started_at=started,
            finished_at=self.engine.clock(),
            status=status,
            usage=usage,
            cost_usd=cost,
            attempts=attempts,
            from_journal=from_journal,
            error=error,
        )
        self.records.append(record)
        self.tree.close(node, status, error)
        _events.emit(
            "call.finish",
            call_id=call_id,
            status=status,
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens,
            cost_usd=cost,
            latency_s=record.latency_s,
            attempts=attempts,
            from_journal=from_journal,
            error=error,
            **({"text": text} if self.config.log_text and text is not None else {}),
        )


def _status_of(exc: BaseException) -> CallStatus:
    if isinstance(exc, BudgetExceeded):
        return "budget"
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        return "cancelled"
    return "error"


def _cell_text(index: int, total: int, result: CellResult) -> str:
    head = f"Output of repl block {index} of {total}" if total > 1 else "REPL output"
    body: list[str] = []
    if result.stdout:
        body.append(result.stdout.rstrip("\n"))
    if result.stderr:
        body.append(result.stderr.rstrip("\n"))
    if result.error:
        body.append(result.error.rstrip("\n"))
    if result.dropped_output_bytes:
        body.append(f"[{result.dropped_output_bytes} bytes of output were discarded while the code ran]")
    if result.status not in ("ok", "error"):
        body.append(f"[the cell ended with status: {result.status}]")
    text = "\n".join(body) if body else "(no output)"
    return f"{head}:\n{text}"
