"""One RLM node's turn loop: generate -> extract code -> execute -> observe -> answer.

`RLMLoop.run` checks that the sandbox can run (a refusal costs no request), then starts the
node's REPL worker beside its first root call (`early_worker.py`: that turn needs only the
context's description); each turn makes one root call, runs every
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

from .. import _events, _official_prompts
from .._config import ModelConfig
from .._context import Context
from .._journal.keys import budget_note
from .._parsing import FinalMarker, find_code_blocks, find_final, truncate_output
from .._prompts import (
    compaction_system_note,
    describe_context,
    first_user_message,
    root_system_prompt,
    session_note,
)
from .._tree import Node, NodeStatus
from .._types import CallKind, Message, ModelRequest
from ..exceptions import BudgetExceeded, FatalError, RetryableError
from ..logger import CodeBlock, LoggedCall, REPLResult, RLMIteration, RLMLogger
from ..sandbox import CellResult, ReplSetup, Worker
from .calls import CallPath
from .compaction import Compactor
from .early_worker import EarlyWorker, WorkerReady
from .fanout import SubCallHandler
from .hedge import book_for, hedge_alone
from .outcome import RunEnded, RunOutcome
from .session import SessionState
from .state import QueryState
from .tools import ToolRunner

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["RLMLoop"]

_FINAL_MAX_TOKENS = 512
_RESTART_NOTICE = "[the REPL worker was killed"


@dataclasses.dataclass(frozen=True, slots=True)
class _TurnResult:
    """What running one reply's cells gave: the answer, if one was set, the observation,
    and each cell's result (for the official observation format and `max_errors`)."""

    answer: str | None
    observation: str
    results: tuple[CellResult, ...] = ()
    blocks: tuple[CodeBlock, ...] = ()
    """Each code block run and what it did, for the official log (only when one is kept)."""

    @property
    def restarts(self) -> list[str]:
        """The notices of workers replaced during the turn (in `observation` already; the
        official observation format, made from `results`, adds them itself)."""
        return [line for line in self.observation.split("\n\n") if line.startswith(_RESTART_NOTICE)]

    @property
    def failed(self) -> bool:
        """A cell raised, wrote to stderr or was stopped: an error turn, as the official
        package counts them for `max_errors`."""
        return any(r.stderr or r.status not in ("ok", "output_limit") for r in self.results)


@dataclasses.dataclass(slots=True)
class _Turn:
    """What the cells of one reply have shown so far; `ended` makes it a `_TurnResult`."""

    limit: int
    """`output_limit_chars`: each block's share of the observation."""
    parts: list[str] = dataclasses.field(default_factory=list)
    results: list[CellResult] = dataclasses.field(default_factory=list)
    logged: list[CodeBlock] = dataclasses.field(default_factory=list)

    def ended(self, answer: str | None) -> _TurnResult:
        return _TurnResult(
            answer, _observation(self.parts, self.limit), tuple(self.results), tuple(self.logged)
        )


class RLMLoop:
    """Runs RLM nodes (the query's root and every child RLM) for one query."""

    def __init__(
        self, engine: Engine, state: QueryState, calls: CallPath, *, logger: RLMLogger | None = None
    ) -> None:
        self._engine = engine
        self._config = engine.config
        self._state = state
        self._calls = calls
        self._logger = logger
        """The official log of the root's turns (`rlm_async.logger`), when one is kept."""

    async def run(
        self,
        context: Context,
        root_prompt: str | None,
        *,
        depth: int,
        parent: Node | None,
        session: SessionState | None = None,
    ) -> RunOutcome:
        """Run one RLM loop to its end, in its own worker (or, for a session's root, in the
        session's worker, which outlives the loop); raises `RunEnded` when a root call
        cannot be made."""
        model = self._config.model_for_depth(depth)
        tree = self._state.tree
        node = tree.open(parent=parent, depth=depth, kind="rlm", model=model.model, label="rlm")
        below = self._config.max_depth - 1 - depth  # levels of child RLMs possible under this one
        try:
            with _events.bind(node_id=node.node_id, depth=depth):
                if session is not None:
                    outcome = await self._run_in_session(session, node, context, root_prompt, model)
                else:
                    asked = self._engine.clock()
                    slots = self._engine.slots
                    async with slots.hold(below=below):
                        _events.emit(
                            _events.WorkerSlotWait,
                            waited_s=self._engine.clock() - asked,
                            live=slots.live,
                            cap=slots.cap,
                        )
                        # The cheap check first: a sandbox that refuses refuses before any call.
                        self._state.isolation = await self._engine.check_sandbox()
                        outcome = await self._run_early(node, context, root_prompt, depth, model)
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

    async def _run_early(
        self, node: Node, context: Context, root_prompt: str | None, depth: int, model: ModelConfig
    ) -> RunOutcome:
        """The node's turns, its worker starting beside the first root call and awaited
        where a cell first needs it; killed (or its start stopped) when the turns end,
        whatever ended them, before the caller gives the slot back."""
        early = EarlyWorker(lambda: self._engine.start_worker(context, self._repl_setup(depth)))
        outcome: RunOutcome | None = None
        failure: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(early.run)
                try:
                    messages = self._opening(context, root_prompt, depth)
                    outcome = await self._loop(node, early.get, messages, root_prompt, depth, model)
                except Exception as exc:  # raised below as itself, not wrapped in an ExceptionGroup
                    failure = exc
                finally:
                    tg.cancel_scope.cancel()  # a start still under way stops and kills what it launched
        finally:
            await early.aclose()
        if failure is not None:
            raise failure
        assert outcome is not None
        return outcome

    async def _run_in_session(
        self, session: SessionState, node: Node, context: Context, root_prompt: str | None, model: ModelConfig
    ) -> RunOutcome:
        """A persistent session's call: this context becomes the next `context_N` of the
        session's worker, and the call's messages its next `history_N` when it ends."""
        worker, index, lost = await session.attach(context, self._repl_setup(0))
        self._state.isolation = worker.tier
        note: str | None = None
        if self._config.official_prompt is None:  # the official format says it in each turn
            note = session_note(
                index=index,
                contexts=session.contexts,
                histories=session.histories,
                compaction=session.compaction,
            )
        if lost is not None:
            note = lost if note is None else f"{lost}\n{note}"
        messages = self._opening(context, root_prompt, 0, note=note)
        counts = (session.contexts, session.histories)
        outcome = await self._loop(node, _ready(worker), messages, root_prompt, 0, model, counts=counts)
        await session.add_history(messages)
        return outcome

    def _repl_setup(self, depth: int) -> ReplSetup | None:
        official = self._config.official_prompt is not None
        tools = self._config.tools_for_depth(depth)
        return tools.repl_setup(list_variables=official) if tools or official else None

    def _opening(
        self, context: Context, root_prompt: str | None, depth: int, *, note: str | None = None
    ) -> list[Message]:
        """The system prompt and the first user message(s): rlm_async's own, or the
        official package's when `official_prompt` is set. `note` ends the first message (a
        session's contexts and histories)."""
        config = self._config
        tools = config.tools_for_depth(depth)
        if config.official_prompt is not None:
            system = _official_prompts.system_message(config.official_prompt, tools)
            first = _official_prompts.metadata_message(context, root_prompt)
        else:
            system = config.system_prompt or root_system_prompt(
                completion_order=config.completion_order,
                hedging=config.model_for_depth(depth + 1).hedge.enabled,
            )
            system += tools.prompt_section()
            first = first_user_message(describe_context(context), root_prompt)
        if config.compaction and depth == 0:
            system += compaction_system_note()
        if note:
            first = f"{first}\n\n{note}"
        messages = [Message("system", system), Message("user", first)]
        if config.user_prologue:
            messages.append(Message("user", config.user_prologue))
        return messages

    async def _run_child(self, prompt: str, depth: int, parent: Node) -> RunOutcome:
        return await self.run(prompt, None, depth=depth, parent=parent)

    async def _loop(
        self,
        node: Node,
        started: WorkerReady,
        messages: list[Message],
        root_prompt: str | None,
        depth: int,
        model: ModelConfig,
        *,
        counts: tuple[int, int] = (1, 0),
    ) -> RunOutcome:
        """The turns of one node over `messages` (changed in place: the caller keeps the
        conversation as it ended), in the worker `started` gives, awaited only where one
        is needed. `counts`: a session's contexts and histories, which the official
        per-turn message names."""
        config = self._config
        official = config.official_prompt is not None
        tools = ToolRunner(
            config.tools_for_depth(depth),
            self._state.ledger,
            self._engine.tool_limiters,
            clock=self._engine.clock,
        )
        handler = SubCallHandler(
            self._engine, self._state, self._calls, self._run_child, node=node, depth=depth, tools=tools
        )
        failed_turns = 0
        # "child": the turn of a child RLM (see CallKind), so hooks and traces tell them apart.
        kind: CallKind = "root" if depth == 0 else "child"
        root = depth == 0
        compactor = Compactor(self._engine, model) if config.compaction and root else None
        prepared: list[Worker] = []

        async def worker() -> Worker:
            if not prepared:
                prepared.append(await started())
                if compactor is not None:
                    await compactor.prepare(prepared[0])
            return prepared[0]

        log = self._logger if root else None

        async def summarise(prompt: list[Message]) -> str:
            return await self._root_turn(node, model, depth, prompt, kind=kind)

        for iteration in range(1, config.max_iterations + 1):
            if root:
                self._state.iterations = iteration
            it_started = self._engine.clock()
            _events.emit(_events.IterationStart, iteration=iteration)
            try:
                try:
                    if compactor is not None:  # before the turn's message, as officially
                        await compactor.maybe_compact(worker, messages, summarise)
                    if official:  # the official package asks for every turn in a message of its own
                        text = _official_prompts.turn_message(
                            iteration - 1,
                            config.max_iterations,
                            context_count=counts[0],
                            history_count=counts[1],
                        )
                        messages.append(Message("user", text))
                    sent = list(messages)
                    reply = await self._root_turn(node, model, depth, messages, kind=kind)
                except BudgetExceeded as exc:
                    return await self._budget_ended(node, worker, model, depth, messages, exc)
                messages.append(Message("assistant", reply))
                turn = await self._execute_reply(worker, reply, iteration, handler, logging=log is not None)
            finally:
                _events.emit(
                    _events.IterationFinish, iteration=iteration, duration_s=self._engine.clock() - it_started
                )
            if log is not None:
                await self._log(log, sent, reply, turn.blocks, turn.answer, self._engine.clock() - it_started)
            if turn.answer is not None:
                messages.pop()  # as officially: a call's history ends with the prompt of its last turn
                return RunOutcome(turn.answer, "ok")
            failed_turns = failed_turns + 1 if turn.failed else 0
            if config.max_errors is not None and failed_turns >= config.max_errors:
                last = next((r.error or r.stderr for r in reversed(turn.results) if r.error or r.stderr), "")
                return RunOutcome(
                    None,
                    "error",
                    f"max_errors ({config.max_errors}) reached: the code of {failed_turns} turns in a row "
                    f"failed; the last error: {last.strip()[-500:]}",
                )
            turn_start = len(messages) - 1  # the reply
            if not official:
                messages.append(Message("user", self._feedback(turn.observation, iteration)))
            elif (seen := _official_prompts.observation(turn.results, config.output_limit_chars)) is not None:
                # A replaced worker is ours to tell of: the official REPL never restarts.
                messages.append(Message("user", "\n\n".join([seen, *turn.restarts])))
            if compactor is not None:
                await compactor.record(await worker(), messages[turn_start:])
        # Out of iterations: one last call asks for the best answer from what is known.
        note = Message(
            "user",
            f"You have used all {config.max_iterations} iterations. Give your best final answer "
            "now, from what you know, on a line of its own: FINAL(your answer).",
        )
        if official:  # the official package's own last request, as it words it
            note = Message("assistant", _official_prompts.FINAL_ASK)
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
        worker: WorkerReady,
        model: ModelConfig,
        depth: int,
        messages: list[Message],
        exc: BudgetExceeded,
    ) -> RunOutcome:
        """A root turn was refused: ask once more, with a small output cap, for the answer."""
        note = Message(
            "user",
            f"The budget is exhausted ({exc.limit} cap {exc.cap:g}). Give your best final answer "
            "now, from what you know, on a line of its own: FINAL(your answer).",
        )
        try:
            answer = await self._final_call(node, worker, model, depth, messages, note)
        except BudgetExceeded:
            answer = None
        return RunOutcome(answer, "budget_exceeded", str(exc), exc.limit)

    async def _final_call(
        self,
        node: Node,
        worker: WorkerReady,
        model: ModelConfig,
        depth: int,
        messages: list[Message],
        note: Message,
    ) -> str | None:
        """One last root call that asks for the answer. Its output cap is small, so that it
        still fits a budget that refused a full turn."""
        final_model = dataclasses.replace(
            model, max_tokens=min(model.max_tokens or _FINAL_MAX_TOKENS, _FINAL_MAX_TOKENS)
        )
        prompt = [*messages, note]
        started = self._engine.clock()
        reply = await self._root_turn(node, final_model, depth, prompt, kind="final")
        marker = find_final(reply)
        answer: str | None
        if marker is None:
            answer = reply.strip() or None
        elif marker.kind == "var":
            answer = await (await worker()).get_variable(marker.value)
        else:
            answer = marker.value
        if depth == 0 and self._logger is not None:
            await self._log(self._logger, prompt, reply, (), answer, self._engine.clock() - started)
        return answer

    async def _log(
        self,
        log: RLMLogger,
        sent: list[Message],
        reply: str,
        blocks: tuple[CodeBlock, ...],
        answer: str | None,
        seconds: float,
    ) -> None:
        """One root turn into the official log; written off the event loop (it holds the
        whole prompt, as the official log does)."""
        entry = RLMIteration(
            prompt=[m.to_dict() for m in sent],
            response=reply,
            code_blocks=blocks,
            final_answer=answer,
            iteration_time=seconds,
        )
        await anyio.to_thread.run_sync(log.log, entry)

    async def _root_turn(
        self, node: Node, model: ModelConfig, depth: int, messages: list[Message], *, kind: CallKind
    ) -> str:
        request = ModelRequest(
            model=model.model,
            messages=tuple(messages),
            max_tokens=model.max_tokens,
            temperature=model.temperature,
            sampling=model.sampling or None,
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
        self,
        worker: WorkerReady,
        reply: str,
        iteration: int,
        handler: SubCallHandler,
        *,
        logging: bool = False,
    ) -> _TurnResult:
        """Run every ```repl block of a reply in order, all of them together within
        `turn_timeout_s`; then look for FINAL/FINAL_VAR. A worker that died (for any reason)
        is replaced before anything else runs in it. A reply with neither blocks nor
        FINAL_VAR does not wait for the worker."""
        blocks = find_code_blocks(reply)
        turn = _Turn(self._config.output_limit_chars)
        answer = None
        if blocks:
            answer = await self._run_blocks(await worker(), blocks, iteration, handler, turn, logging=logging)
        if answer is not None:  # code set it: a FINAL line in the reply is not looked at
            return turn.ended(answer)
        marker = find_final(reply)
        if marker is not None and marker.kind == "text":
            answer = marker.value
        elif marker is not None:
            answer = await self._final_marker(await worker(), marker, turn.parts)
        elif not blocks:
            turn.parts.append(
                "Your reply had no ```repl block and no FINAL(...) line. Write Python in a ```repl block "
                "to work with `context`, or give your answer as FINAL(...)."
            )
        return turn.ended(answer)

    async def _run_blocks(
        self,
        worker: Worker,
        blocks: list[str],
        iteration: int,
        handler: SubCallHandler,
        turn: _Turn,
        *,
        logging: bool,
    ) -> str | None:
        """Run `blocks` in order until one sets the answer (returned) or the turn's time runs
        out; what each showed goes into `turn`."""
        turn_limit = self._config.turn_timeout_s
        clock = self._engine.clock
        deadline = None if turn_limit is None else clock() + turn_limit
        for index, code in enumerate(blocks, start=1):
            left = None if deadline is None else deadline - clock()
            if left is not None and left <= 0:
                turn.parts.append(_not_run(index, len(blocks), turn_limit))
                break
            await self._ensure_alive(worker, turn.parts)
            result = await self._run_block(
                worker, code, iteration, index, handler, turn, left, logging=logging
            )
            if result is None:  # the turn's bound ran out inside this block
                await self._turn_ran_out(worker, iteration, index, len(blocks), left or 0.0, turn)
                break
            await self._observe(worker, iteration, index, len(blocks), result, turn)
            if result.final_answer is not None:
                return result.final_answer
        return None

    async def _run_block(
        self,
        worker: Worker,
        code: str,
        iteration: int,
        index: int,
        handler: SubCallHandler,
        turn: _Turn,
        left: float | None,
        *,
        logging: bool,
    ) -> CellResult | None:
        """One block, within the `left` seconds of the turn (None: the bound ran out while it
        ran). With `logging`, it and the sub-calls it made go into the official log."""
        _events.emit(_events.CellStart, iteration=iteration, cell=index)
        result: CellResult | None = None
        calls = handler.observe() if logging else None
        try:
            with anyio.move_on_after(math.inf if left is None else left):
                result = await worker.run_cell(code, handler)
        finally:
            handler.stop_observing()
        if calls is not None and result is not None:
            turn.logged.append(await _logged_block(worker, code, result, calls))
        return result

    async def _observe(
        self, worker: Worker, iteration: int, index: int, total: int, result: CellResult, turn: _Turn
    ) -> None:
        """What block `index` of `total` did, into the trace and the observation; a worker
        it left dead is replaced."""
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
        turn.parts.append(truncate_output(_cell_text(index, total, result), turn.limit))
        turn.results.append(result)
        if result.worker_dead:
            await self._ensure_alive(worker, turn.parts, why=result.status)

    async def _turn_ran_out(
        self, worker: Worker, iteration: int, index: int, total: int, ran_s: float, turn: _Turn
    ) -> None:
        """The turn's time ran out inside block `index` (its cell was cancelled, which killed
        the worker): a timeout result for it, a fresh worker, and a note on the blocks after
        it, which do not run."""
        turn_limit = self._config.turn_timeout_s
        _events.emit(
            _events.CellFinish,
            iteration=iteration,
            cell=index,
            duration_s=ran_s,
            status="turn_timeout",
            stdout_chars=0,
            stderr_chars=0,
            error=f"stopped at turn_timeout_s={turn_limit:g}",
        )
        stopped = (
            f"[stopped: the turn's time limit (turn_timeout_s={turn_limit:g} s, all blocks of one "
            "reply together) ran out while this block ran]"
        )
        turn.parts.append(f"{_head(index, total)}:\n{stopped}")
        turn.results.append(
            CellResult(
                stdout="",
                stderr="",
                error=stopped,
                status="timeout",
                final_answer=None,
                dropped_output_bytes=0,
                duration_s=ran_s,
                worker_dead=True,
            )
        )
        await self._ensure_alive(worker, turn.parts)
        if index < total:
            turn.parts.append(_not_run(index + 1, total, turn_limit))

    async def _final_marker(self, worker: Worker, marker: FinalMarker, parts: list[str]) -> str | None:
        """The answer a FINAL_VAR(name) line gives, or None with a note in `parts` saying
        why it gave none (a FINAL(...) line's text needs no worker: `_execute_reply`)."""
        await self._ensure_alive(worker, parts)
        value = await worker.get_variable(marker.value)
        if value is not None:
            return value
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
        return None

    async def _ensure_alive(self, worker: Worker, parts: list[str], *, why: str | None = None) -> None:
        """Replace a worker that is not running, and tell the model its variables are gone."""
        if worker.alive:
            return
        await worker.restart()
        session = worker.holds("context_1") or worker.holds("history_0")
        reloaded = "every context and history (context_N, history_N) is" if session else "`context` is"
        parts.append(
            f"{_RESTART_NOTICE} ({why or 'it had stopped'}) and a fresh one started: {reloaded} "
            "reloaded, but every variable you created is gone]"
        )

    def _feedback(self, observation: str, iteration: int) -> str:
        total = self._config.max_iterations
        budget = self._state.ledger.describe_remaining()
        lines = [observation, "", f"[iteration {iteration} of {total}; {total - iteration} left]"]
        if budget:
            lines.append(budget_note(budget))
        return "\n".join(lines)


def _ready(worker: Worker) -> WorkerReady:
    """A worker already running (a session's), as the turn loop takes one."""

    async def ready() -> Worker:
        return worker

    return ready


async def _logged_block(worker: Worker, code: str, result: CellResult, calls: list[LoggedCall]) -> CodeBlock:
    """One code block as the official log shows it; `locals` describes the variables."""
    names = await worker.describe_variables() if worker.alive else {}
    stderr = "\n".join(t.rstrip("\n") for t in (result.stderr, result.error) if t)
    return CodeBlock(
        code=code,
        result=REPLResult(
            stdout=result.stdout,
            stderr=stderr,
            locals=names,
            execution_time=result.duration_s,
            rlm_calls=tuple(calls),
            final_answer=result.final_answer,
        ),
    )


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
