"""One cell's conversation on a worker's control channel: send the code, serve the sub-calls
it makes while it runs, and wait for its `done` under a deadline that stops while sub-calls
are outstanding."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from .._prompt_batch import prompt_chars
from ..exceptions import BudgetExceeded, SandboxError
from ._channel import Channel, ChannelClosed, ProtocolViolation
from ._config import RequestHandler, SandboxConfig, ToolCallError, WorkerRequest
from ._protocol import Outcome, parse_cancel, parse_done, parse_request

__all__ = ["CellExchange"]

_MAX_PENDING_REQUESTS = 256
"""Requests one worker may have in flight (and their prompts at most 4 x
`max_message_bytes`): a worker writing frames straight to its socket could otherwise make
the engine hold any number of them."""


class _CellClock:
    """A cancel scope's deadline that stops while sub-calls are outstanding."""

    def __init__(self, timeout: float | None) -> None:
        self._left = math.inf if timeout is None else timeout
        self._outstanding = 0
        self._since = 0.0
        self._scope: anyio.CancelScope | None = None

    def start(self, scope: anyio.CancelScope) -> None:
        self._scope = scope
        self._since = anyio.current_time()
        scope.deadline = self._since + self._left

    def pause(self) -> None:
        assert self._scope is not None
        if self._outstanding == 0:
            self._left -= anyio.current_time() - self._since
            self._scope.deadline = math.inf
        self._outstanding += 1

    def resume(self) -> None:
        assert self._scope is not None
        self._outstanding -= 1
        if self._outstanding == 0:
            self._since = anyio.current_time()
            self._scope.deadline = self._since + self._left


_OFF_LOOP_BYTES = 4 << 20
_OFF_LOOP_PROMPTS = 2_000


def _check_results(results: object, n: int) -> list[str]:
    if not isinstance(results, list) or len(results) != n or not all(isinstance(r, str) for r in results):
        raise SandboxError(f"on_request must return a list of {n} str (one per prompt), got {results!r:.200}")
    return results


class CellExchange:
    """Runs one cell. `on_closed` says why the channel closed mid-cell (the worker died, or
    was killed). An exception from `on_request` other than `BudgetExceeded` ends the cell
    and is kept in `handler_error` for the caller to re-raise."""

    def __init__(
        self,
        channel: Channel,
        config: SandboxConfig,
        on_request: RequestHandler,
        on_closed: Callable[[], Awaitable[Outcome]],
    ) -> None:
        self._channel = channel
        self._config = config
        self._on_request = on_request
        self._on_closed = on_closed
        self._clock = _CellClock(config.cell_timeout_s)
        self._pending: dict[int, int] = {}
        """Request id -> characters of prompts held."""
        self._streams: dict[int, anyio.CancelScope] = {}
        """Streaming requests being served, which the worker may cancel."""
        self.handler_error: BaseException | None = None

    async def run(self, cell: int, code: str) -> Outcome:
        """Send the cell, serve its requests, wait for `done` under the pausable deadline."""
        outcome: Outcome | None = None
        with anyio.CancelScope() as deadline:
            self._clock.start(deadline)
            async with anyio.create_task_group() as tg:
                try:
                    await self._channel.send({"op": "exec", "cell": cell, "code": code})
                    outcome = await self._until_done(cell, tg, deadline)
                except ProtocolViolation as exc:
                    outcome = Outcome(
                        "crashed", error=f"protocol violation: {exc}; the worker was killed", kill=True
                    )
                except ChannelClosed:
                    outcome = await self._on_closed()
                tg.cancel_scope.cancel()
        if outcome is None:
            if self.handler_error is not None:
                return Outcome("crashed", kill=True)
            return Outcome(
                "timeout",
                error=f"the cell ran past cell_timeout_s={self._config.cell_timeout_s:g} s (time waiting for "
                "sub-calls not counted); the worker was killed",
                kill=True,
            )
        if self._pending and not outcome.kill:
            return await self._abandon_pending(outcome)
        return outcome

    async def _until_done(self, cell: int, tg: TaskGroup, deadline: anyio.CancelScope) -> Outcome:
        """Receive frames, starting a server task per request, until this cell's `done`."""
        while True:
            msg, blob = await self._channel.receive()
            op = msg["op"]
            if op == "request":
                if len(blob) > _OFF_LOOP_BYTES or len(msg.get("lengths") or ()) > _OFF_LOOP_PROMPTS:
                    # Cutting a large blob into prompts is work proportional to the batch:
                    # done in a thread, so the event loop (every other query) keeps running.
                    rid, request = await anyio.to_thread.run_sync(
                        parse_request, msg, blob, self._config.max_batch_prompts
                    )
                else:
                    rid, request = parse_request(msg, blob, self._config.max_batch_prompts)
                del blob  # its text is in request.prompts now
                self._admit(rid, request)
                if request.op != "tool":  # a tool call runs on the cell's own clock
                    self._clock.pause()
                tg.start_soon(self._serve, rid, request, deadline)
            elif op == "cancel":
                scope = self._streams.get(parse_cancel(msg))
                if scope is not None:
                    scope.cancel()
            elif op == "done":
                number = msg.get("cell")
                if isinstance(number, int) and number < cell:
                    continue  # a stale report from a cell a forged `done` cut short
                if number != cell:
                    raise ProtocolViolation(f"done for cell {number!r} while running cell {cell}")
                return parse_done(msg)
            else:
                raise ProtocolViolation(f"unexpected {op!r} frame during a cell")

    def _admit(self, rid: int, request: WorkerRequest) -> None:
        """Count a request as pending, within the caps on requests and characters held."""
        pending = self._pending
        if rid in pending:
            raise ProtocolViolation(f"request id {rid} reused while pending")
        size = prompt_chars(request.prompts)
        if (
            len(pending) >= _MAX_PENDING_REQUESTS
            or sum(pending.values()) + size > 4 * self._config.max_message_bytes
        ):
            # Honest code has at most one call in flight per thread.
            raise ProtocolViolation(
                f"too many sub-calls in flight at once ({len(pending) + 1}, "
                f"{sum(pending.values()) + size:,} characters)"
            )
        pending[rid] = size

    async def _serve(self, rid: int, request: WorkerRequest, deadline: anyio.CancelScope) -> None:
        """Answer one request. Cancelled (the cell ended first), it stays in `_pending` and
        the worker's waiting thread is told it was abandoned.

        A streaming request (`llm_batch_stream`) is answered with one `result` frame per
        slot as it is filled, then a `reply` with `end`; the worker may `cancel` it, which
        cancels its sub-calls (unsent ones release their reservations) and sends nothing more."""
        try:
            reply: dict[str, Any] | None = None
            try:
                if request.op == "llm_batch_stream":
                    reply = await self._serve_stream(rid, request)
                else:
                    results = _check_results(await self._on_request(request), len(request.prompts))
                    reply = {"op": "reply", "id": rid, "results": results}
            except BudgetExceeded as exc:
                reply = {"op": "reply", "id": rid, "error": "budget", "message": str(exc)}
            except ToolCallError as exc:
                reply = {"op": "reply", "id": rid, "error": "tool", "message": str(exc)}
            self._pending.pop(rid, None)
            if reply is None:  # cancelled by the worker: it no longer listens
                return
            try:
                await self._channel.send(reply, atomic=True)
            except ChannelClosed:
                pass  # the worker died or stopped reading; the cell loop sees it
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:  # an engine-side failure: end the cell, kill, re-raise
            self._pending.pop(rid, None)
            self.handler_error = exc
            deadline.cancel()
        finally:
            if request.op != "tool":
                self._clock.resume()

    async def _serve_stream(self, rid: int, request: WorkerRequest) -> dict[str, Any] | None:
        n = len(request.prompts)
        sent: set[int] = set()

        async def on_result(index: int, text: str) -> None:
            if not (0 <= index < n) or index in sent or not isinstance(text, str):
                raise SandboxError(
                    f"on_result: slot {index!r} of {n} reported twice, out of range or not str"
                )
            sent.add(index)
            try:
                await self._channel.send(
                    {"op": "result", "id": rid, "index": index, "text": text}, atomic=True
                )
            except ChannelClosed:
                pass  # the worker died or stopped reading; the cell loop sees it

        with anyio.CancelScope() as scope:
            self._streams[rid] = scope
            try:
                _check_results(await self._on_request(dataclasses.replace(request, on_result=on_result)), n)
            finally:
                del self._streams[rid]
        if scope.cancelled_caught:
            return None
        if len(sent) != n:
            raise SandboxError(f"on_request reported {len(sent)} of {n} slots of a streaming request")
        return {"op": "reply", "id": rid, "end": n}

    async def _abandon_pending(self, outcome: Outcome) -> Outcome:
        """Threads of the code still wait on sub-calls the cell no longer serves: tell them."""
        try:
            for rid in sorted(self._pending):
                await self._channel.send(
                    {
                        "op": "reply",
                        "id": rid,
                        "error": "abandoned",
                        "message": "the cell finished before this sub-call was answered",
                    },
                    atomic=True,
                )
        except ChannelClosed:
            return Outcome("crashed", error="the worker stopped reading its control channel", kill=True)
        return outcome
