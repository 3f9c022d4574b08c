"""One RLM node's turn loop: generate -> extract code -> execute -> observe -> answer.

`RLMLoop.run` starts the node's REPL worker, then each turn makes one root call, runs every
```repl block of the reply in order in the worker, and appends what the cells printed as the
next user message (the history is append-only, so the prompt prefix never changes). It ends
when code sets the answer or the reply has FINAL/FINAL_VAR; out of iterations or budget, one
last small call asks for the best answer. The worker is killed in a shielded `finally`,
whatever ended the node, and only then gives its slot back (`slots.py`: the process-wide
cap on live workers).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import anyio

from .. import _events
from .._config import ModelConfig
from .._context import Context
from .._parsing import find_code_blocks, find_final, truncate_output
from .._prompts import describe_context, first_user_message, root_system_prompt
from .._tree import Node, NodeStatus
from .._types import CallKind, Message, ModelRequest
from ..exceptions import BudgetExceeded, FatalError, RetryableError
from ..sandbox import CellResult, Worker, start_worker
from .calls import CallPath
from .fanout import SubCallHandler
from .hedge import book_for, hedge_alone
from .outcome import RunEnded, RunOutcome
from .state import QueryState

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["RLMLoop"]

_FINAL_MAX_TOKENS = 512


@dataclasses.dataclass(frozen=True, slots=True)
class _TurnResult:
    """What running one reply's cells gave: the answer, if one was set, and the observation."""

    answer: str | None
    observation: str


class RLMLoop:
    """Runs RLM nodes (the query's root and every child RLM) for one query."""

    def __init__(self, engine: Engine, state: QueryState, calls: CallPath) -> None:
        self._engine = engine
        self._config = engine.config
        self._state = state
        self._calls = calls

    async def run(
        self, context: Context, root_prompt: str | None, *, depth: int, parent: Node | None
    ) -> RunOutcome:
        """Run one RLM loop to its end, in its own worker; raises `RunEnded` when a root call
        cannot be made."""
        model = self._config.model_for_depth(depth)
        tree = self._state.tree
        node = tree.open(parent=parent, depth=depth, kind="rlm", model=model.model, label="rlm")
        worker: Worker | None = None
        below = self._config.max_depth - 1 - depth  # levels of child RLMs possible under this one
        try:
            with _events.bind(node_id=node.node_id, depth=depth):
                async with self._engine.slots.hold(below=below):
                    try:
                        worker = await start_worker(context, self._config.sandbox)
                        self._state.isolation = worker.tier
                        outcome = await self._loop(node, worker, context, root_prompt, depth, model)
                    finally:
                        if worker is not None:  # before the slot is given back
                            with anyio.CancelScope(shield=True):
                                await worker.aclose()
            tree.close(node, "ok" if outcome.status == "ok" else "error", outcome.detail)
            return outcome
        except RunEnded as ended:
            status: NodeStatus = "budget" if ended.outcome.status == "budget_exceeded" else "error"
            tree.close(node, status, ended.outcome.detail)
            raise
        except anyio.get_cancelled_exc_class():
            tree.close(node, "cancelled")
            raise
        except BaseException as exc:
            tree.close(node, "error", f"{type(exc).__name__}: {exc}")
            raise

    async def _run_child(self, prompt: str, depth: int, parent: Node) -> RunOutcome:
        return await self.run(prompt, None, depth=depth, parent=parent)

    async def _loop(
        self,
        node: Node,
        worker: Worker,
        context: Context,
        root_prompt: str | None,
        depth: int,
        model: ModelConfig,
    ) -> RunOutcome:
        config = self._config
        messages: list[Message] = [
            Message(
                "system",
                config.system_prompt
                or root_system_prompt(
                    completion_order=config.completion_order,
                    hedging=config.model_for_depth(depth + 1).hedge.enabled,
                ),
            ),
            Message("user", first_user_message(describe_context(context), root_prompt)),
        ]
        handler = SubCallHandler(
            self._engine, self._state, self._calls, self._run_child, node=node, depth=depth
        )
        # "child": the turn of a child RLM (see CallKind), so hooks and traces tell them apart.
        kind: CallKind = "root" if depth == 0 else "child"
        for iteration in range(1, config.max_iterations + 1):
            if depth == 0:
                self._state.iterations = iteration
            it_started = self._engine.clock()
            _events.emit(_events.IterationStart, iteration=iteration)
            try:
                try:
                    reply = await self._root_turn(node, model, depth, messages, kind=kind)
                except BudgetExceeded as exc:
                    return await self._budget_ended(node, worker, model, depth, messages, exc)
                messages.append(Message("assistant", reply))
                turn = await self._execute_reply(worker, reply, iteration, handler)
            finally:
                _events.emit(
                    _events.IterationFinish, iteration=iteration, duration_s=self._engine.clock() - it_started
                )
            if turn.answer is not None:
                return RunOutcome(turn.answer, "ok")
            messages.append(Message("user", self._feedback(turn.observation, iteration)))
        # Out of iterations: one last call asks for the best answer from what is known.
        note = (
            f"You have used all {config.max_iterations} iterations. Give your best final answer "
            "now, from what you know, on a line of its own: FINAL(your answer)."
        )
        detail = f"max_iterations ({config.max_iterations}) reached; the answer comes from a final call"
        try:
            answer = await self._final_call(node, worker, model, depth, messages, note)
        except BudgetExceeded as exc:
            return RunOutcome(
                None, "budget_exceeded", f"{detail}, which the budget refused: {exc}", exc.limit
            )
        return RunOutcome(answer, "max_iterations", detail)

    async def _budget_ended(
        self,
        node: Node,
        worker: Worker,
        model: ModelConfig,
        depth: int,
        messages: list[Message],
        exc: BudgetExceeded,
    ) -> RunOutcome:
        """A root turn was refused: ask once more, with a small output cap, for the answer."""
        note = (
            f"The budget is exhausted ({exc.limit} cap {exc.cap:g}). Give your best final answer "
            "now, from what you know, on a line of its own: FINAL(your answer)."
        )
        try:
            answer = await self._final_call(node, worker, model, depth, messages, note)
        except BudgetExceeded:
            answer = None
        return RunOutcome(answer, "budget_exceeded", str(exc), exc.limit)

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
            if kind == "child" and model.hedge.enabled:
                # A child RLM is hedged call by call: its turns here, its sub-calls in their
                # fan-outs. A second whole child would replay the first's calls (the journal
                # sends identical calls in flight once) and cost a worker.
                completion = await hedge_alone(
                    model.hedge,
                    book_for(self._engine.governor),
                    key=f"{model.model} (child turns)",
                    clock=self._engine.clock,
                    call=lambda hedge: self._calls.call_model(node, depth, kind, request, model, hedge=hedge),
                )
            else:
                completion = await self._calls.call_model(node, depth, kind, request, model)
        except (FatalError, RetryableError) as exc:
            raise RunEnded("error", f"root model call failed: {exc}") from exc
        return completion.text

    async def _execute_reply(
        self, worker: Worker, reply: str, iteration: int, handler: SubCallHandler
    ) -> _TurnResult:
        """Run every ```repl block of a reply in order, all of them together within
        `turn_timeout_s`; then look for FINAL/FINAL_VAR. A worker that died (for any reason)
        is replaced before anything else runs in it."""
        blocks = find_code_blocks(reply)
        parts: list[str] = []
        limit = self._config.output_limit_chars
        turn_limit = self._config.turn_timeout_s
        clock = self._engine.clock
        deadline = None if turn_limit is None else clock() + turn_limit
        for index, code in enumerate(blocks, start=1):
            left = None if deadline is None else deadline - clock()
            if left is not None and left <= 0:
                parts.append(_not_run(index, len(blocks), turn_limit))
                break
            await self._ensure_alive(worker, parts)
            _events.emit(_events.CellStart, iteration=iteration, cell=index)
            result: CellResult | None = None
            with anyio.move_on_after(math.inf if left is None else left):
                result = await worker.run_cell(code, handler)
            if result is None:  # the turn's bound ran out inside this block
                _events.emit(
                    _events.CellFinish,
                    iteration=iteration,
                    cell=index,
                    duration_s=left or 0.0,
                    status="turn_timeout",
                    stdout_chars=0,
                    stderr_chars=0,
                    error=f"stopped at turn_timeout_s={turn_limit:g}",
                )
                parts.append(
                    f"{_head(index, len(blocks))}:\n[stopped: the turn's time limit (turn_timeout_s="
                    f"{turn_limit:g} s, all blocks of one reply together) ran out while this block ran]"
                )
                await self._ensure_alive(worker, parts)
                if index < len(blocks):
                    parts.append(_not_run(index + 1, len(blocks), turn_limit))
                break
            _events.emit(
                _events.CellFinish,
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
                await self._ensure_alive(worker, parts, why=result.status)
            if result.final_answer is not None:
                return _TurnResult(result.final_answer, _observation(parts, limit))
        marker = find_final(reply)
        if marker is not None:
            if marker.kind == "text":
                return _TurnResult(marker.value, _observation(parts, limit))
            await self._ensure_alive(worker, parts)
            value = await worker.get_variable(marker.value)
            if value is not None:
                return _TurnResult(value, _observation(parts, limit))
            if not worker.alive:  # str() of it hung (or the worker died): not "no such variable"
                timeout = self._config.sandbox.cell_timeout_s
                parts.append(
                    f"FINAL_VAR({marker.value}): turning {marker.value!r} into text did not finish"
                    + (f" within {timeout:g} s" if timeout is not None else "")
                    + " (its __str__ hangs?), so the worker was killed."
                )
                await self._ensure_alive(worker, parts, why="get_variable")
            else:
                parts.append(
                    f"FINAL_VAR({marker.value}): no variable named {marker.value!r} exists. "
                    "Assign it in a ```repl block first."
                )
        if not blocks and marker is None:
            parts.append(
                "Your reply had no ```repl block and no FINAL(...) line. Write Python in a ```repl block "
                "to work with `context`, or give your answer as FINAL(...)."
            )
        return _TurnResult(None, _observation(parts, limit))

    async def _ensure_alive(self, worker: Worker, parts: list[str], *, why: str | None = None) -> None:
        """Replace a worker that is not running, and tell the model its variables are gone."""
        if worker.alive:
            return
        await worker.restart()
        parts.append(
            f"[the REPL worker was killed ({why or 'it had stopped'}) and a fresh one started: `context` is "
            "reloaded, but every variable you created is gone]"
        )

    def _feedback(self, observation: str, iteration: int) -> str:
        total = self._config.max_iterations
        budget = self._state.ledger.describe_remaining()
        lines = [observation, "", f"[iteration {iteration} of {total}; {total - iteration} left]"]
        if budget:
            lines.append(f"[budget left: {budget}]")
        return "\n".join(lines)


def _head(index: int, total: int) -> str:
    return f"Output of repl block {index} of {total}" if total > 1 else "REPL output"


def _not_run(first: int, total: int, limit: float | None) -> str:
    which = f"block {first}" if first == total else f"blocks {first} to {total}"
    return (
        f"[{which} of {total} did not run: the turn's time limit (turn_timeout_s={limit:g} s) ran out; "
        "run them again in your next reply if you still need them]"
    )


def _observation(parts: list[str], limit: int) -> str:
    """What the cells of one turn showed, at most four times the per-block limit: a reply of
    thousands of blocks must not make the next prompt unbounded."""
    return truncate_output("\n\n".join(parts), 4 * limit)


def _cell_text(index: int, total: int, result: CellResult) -> str:
    head = _head(index, total)
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
