"""One RLM node's turn loop: generate -> extract code -> execute -> observe -> answer.

`RLMLoop.run` starts the node's REPL worker, then each turn makes one root call, runs every
```repl block of the reply in order in the worker, and appends what the cells printed as the
next user message (the history is append-only, so the prompt prefix never changes). It ends
when code sets the answer or the reply has FINAL/FINAL_VAR; out of iterations or budget, one
last small call asks for the best answer. The worker is killed in a shielded `finally`,
whatever ended the node.
"""

from __future__ import annotations

import dataclasses
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
        try:
            with _events.bind(node_id=node.node_id, depth=depth):
                worker = await start_worker(context, self._config.sandbox)
                outcome = await self._loop(node, worker, context, root_prompt, depth, model)
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
        finally:
            if worker is not None:
                with anyio.CancelScope(shield=True):
                    await worker.aclose()

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
            Message("system", config.system_prompt or root_system_prompt()),
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
            completion = await self._calls.call_model(node, depth, kind, request, model)
        except (FatalError, RetryableError) as exc:
            raise RunEnded("error", f"root model call failed: {exc}") from exc
        return completion.text

    async def _execute_reply(
        self, worker: Worker, reply: str, iteration: int, handler: SubCallHandler
    ) -> _TurnResult:
        """Run every ```repl block of a reply in order; then look for FINAL/FINAL_VAR."""
        blocks = find_code_blocks(reply)
        parts: list[str] = []
        limit = self._config.output_limit_chars
        for index, code in enumerate(blocks, start=1):
            _events.emit(_events.CellStart, iteration=iteration, cell=index)
            result = await worker.run_cell(code, handler)
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
                await worker.restart()
                parts.append(
                    f"[the REPL worker was killed ({result.status}) and a fresh one started: `context` is "
                    "reloaded, but every variable you created is gone]"
                )
            if result.final_answer is not None:
                return _TurnResult(result.final_answer, "\n\n".join(parts))
        marker = find_final(reply)
        if marker is not None:
            if marker.kind == "text":
                return _TurnResult(marker.value, "\n\n".join(parts))
            value = await worker.get_variable(marker.value)
            if value is not None:
                return _TurnResult(value, "\n\n".join(parts))
            parts.append(
                f"FINAL_VAR({marker.value}): no variable named {marker.value!r} exists. "
                "Assign it in a ```repl block first."
            )
        if not blocks and marker is None:
            parts.append(
                "Your reply had no ```repl block and no FINAL(...) line. Write Python in a ```repl block "
                "to work with `context`, or give your answer as FINAL(...)."
            )
        return _TurnResult(None, "\n\n".join(parts))

    def _feedback(self, observation: str, iteration: int) -> str:
        total = self._config.max_iterations
        budget = self._state.ledger.describe_remaining()
        lines = [observation, "", f"[iteration {iteration} of {total}; {total - iteration} left]"]
        if budget:
            lines.append(f"[budget left: {budget}]")
        return "\n".join(lines)


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
