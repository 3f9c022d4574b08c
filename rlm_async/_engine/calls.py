"""The choke point: every model call of a query's tree passes `CallPath.call_model`.

In order: a node in the call tree and a `call.start` event; the server's settings (found
at the model's first use) and the request made to fit its context window — a prompt that
cannot fit is refused here, before anything is sent — with what the governor will reserve
for it and its journal key (a `PreparedCall`, which a fan-out's followers make while the
warm-up call is in flight: nothing in it is admission); the journal (a reusable call
found there is not sent, identical calls in flight are sent once); the governor, which
reserves the call's budget before sending, waits for rate limits and concurrency, retries,
and settles the reservation with the reported usage; then one `CallRecord` and one
`call.finish` event for every outcome — paid, failed, refused or cancelled — so nothing
already paid for is lost.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from .. import _events
from .._config import ModelConfig
from .._governor import CallPlan, CallTally
from .._servers import Fitted, ServerSettings, fit
from .._tree import Node
from .._types import CallKind, CallRecord, CallStatus, Completion, HedgeSummary, ModelRequest, Usage
from ..exceptions import BudgetExceeded, ContextLengthExceeded
from ..transport import Encoded, Transport
from .state import QueryState

if TYPE_CHECKING:
    from .engine import Engine
    from .hedge import FanoutHedger

__all__ = ["CallPath", "PreparedCall"]

_NO_USAGE = Usage()


@dataclass(frozen=True, slots=True)
class _Call:
    """One model call on its way: what the record and the events need to name it."""

    node: Node
    call_id: str
    kind: CallKind
    request: ModelRequest
    transport: Transport
    hedge: tuple[FanoutHedger, int] | None = None
    """A fan-out's hedger and this call's slot: copies race inside one logical call."""


@dataclass(frozen=True, slots=True)
class PreparedCall:
    """What one call can have worked out before it may be sent: none of it depends on the
    budget's or the limits' state, and none of it holds anything back (no reservation, no
    permit, no connection), so dropping it unsent leaks nothing. Admission (reserve, then
    wait for the limits) stays at send time, in the governor."""

    server: ServerSettings
    """The settings it was fitted to: if the server's have changed since (a window learnt
    from a `context_length_exceeded`), the call is prepared again."""
    fitted: Fitted
    plan: CallPlan
    key: str | None
    """The journal key of `fitted.request`; `None` without a journal."""
    encoded: Encoded | None
    """Its body, made ahead by the transport; taken by the first attempt that sends it."""


class CallPath:
    """Journal -> governor -> transport -> record, for one query."""

    def __init__(self, engine: Engine, state: QueryState) -> None:
        self._engine = engine
        self._state = state
        self._log_text = engine.config.log_text

    async def call_model(
        self,
        parent: Node,
        depth: int,
        kind: CallKind,
        request: ModelRequest,
        model: ModelConfig,
        *,
        hedge: tuple[FanoutHedger, int] | None = None,
        prepared: PreparedCall | None = None,
    ) -> Completion:
        """Make one model call under the query's budget; raises what the call raised
        (`BudgetExceeded`, a `TransportError`, cancellation) after recording it. With
        `hedge` (a fan-out's hedger and this call's slot), copies race inside the journal's
        one logical call. `prepared`: `prepare(request, model, ...)` made earlier."""
        node = self._state.tree.open(parent=parent, depth=depth, kind="llm", model=request.model, label=kind)
        call = _Call(
            node, self._state.next_call_id(), kind, request, self._engine.transport_for(model), hedge
        )
        started = self._engine.clock()
        with _events.bind(node_id=node.node_id, depth=depth):
            _events.emit(
                _events.CallStart,
                call_id=call.call_id,
                parent_id=parent.node_id,
                call_kind=kind,
                model=request.model,
                prompt_chars=request.prompt_chars(),
                # Prompt text may hold private data: only with log_text=True.
                prompt=request.messages[-1].content if self._log_text else None,
            )
            tally = CallTally()
            hedged: list[HedgeSummary] = []
            try:
                completion, from_journal = await self._send(call, model, tally, hedged, prepared)
            except BaseException as exc:
                if isinstance(exc, ContextLengthExceeded) and tally.attempts:
                    # The server's own 400 names a window it did not report: refuse the next
                    # prompt that cannot fit before sending it.
                    self._engine.learn_window(model, str(exc))
                self._record(
                    call,
                    started,
                    _status_of(exc),
                    attempts=tally.attempts,
                    error=f"{type(exc).__name__}: {exc}",
                    # Hedge copies may have billed their input before the call failed.
                    usage=tally.spent.as_usage() if hedge is not None else _NO_USAGE,
                    cost=float(tally.spent.usd) if hedge is not None else 0.0,
                )
                raise
            self._record(
                call,
                started,
                "ok",
                # A journal hit consumed no tokens: its usage belongs to the call that paid.
                # A hedged call's usage is every copy's (cancelled losers billed their input).
                usage=_NO_USAGE if from_journal else (tally.spent.as_usage() if hedged else completion.usage),
                cost=0.0 if from_journal else float(tally.spent.usd),
                attempts=0 if from_journal else tally.attempts,
                from_journal=from_journal,
                text=completion.text,
                hedge=hedged[0] if hedged else None,
                usage_estimated=not from_journal and not completion.usage_reported,
            )
        return completion

    async def prepare(
        self, request: ModelRequest, model: ModelConfig, *, hedged: bool = False, encode: bool = False
    ) -> PreparedCall:
        """Fit `request` to its server, plan what the governor will reserve for it, its
        journal key, and with `encode` its body: everything but admission and sending.
        Raises what fitting raises (a prompt that cannot fit the window). `hedged`: the call
        races copies (each bills its prompt if cancelled after sending)."""
        engine = self._engine
        server = await engine.server_settings(model)
        governor = engine.governor
        bound = governor.estimator.prompt_tokens(request)
        guess = governor.rate_estimator.prompt_tokens(request)
        transport = engine.transport_for(model)
        fitted = await self._fit(request, server, transport, bound, guess)
        plan = governor.plan(
            fitted.request,
            price=model.prices,
            prompt_tokens=fitted.prompt_tokens,
            bill_cancelled_prompt=hedged,
            prompt_bound=bound,  # the estimators count the messages, which fitting keeps
            rate_prompt=guess,
        )
        journal = engine.journal
        return PreparedCall(
            server,
            fitted,
            plan,
            None if journal is None else journal.key(fitted.request),
            transport.encode(plan.request) if encode else None,
        )

    async def _send(
        self,
        call: _Call,
        model: ModelConfig,
        tally: CallTally,
        hedged: list[HedgeSummary],
        prepared: PreparedCall | None,
    ) -> tuple[Completion, bool]:
        """Through the journal, if any, to the governor (which reserves the budget, waits for
        the rate limits, sends and retries), or to the hedger's race of governed copies.
        Returns the completion and whether it came from the journal."""
        if prepared is None or prepared.server is not await self._engine.server_settings(model):
            prepared = await self.prepare(call.request, model, hedged=call.hedge is not None)
        # Partials of methods, not closures: a wide fan-out holds thousands of these calls
        # at once, and each nested closure costs a coroutine frame, a function and its cells.
        copy = functools.partial(self._governed, call, model, prepared)
        send: Callable[[], Awaitable[Completion]] = (
            functools.partial(copy, tally)
            if call.hedge is None
            else functools.partial(self._hedged, call, copy, tally, hedged)
        )
        journal = self._engine.journal
        if journal is None:
            return await send(), False
        # Every call goes through the journal: reusable ones are looked up (and identical
        # temperature-0 ones in flight sent once); all are recorded.
        return await journal.call(prepared.fitted.request, send, call_id=call.call_id, key=prepared.key)

    async def _governed(
        self, call: _Call, model: ModelConfig, prepared: PreparedCall, tally: CallTally
    ) -> Completion:
        """One governed copy of the call: budget reserved, limits waited for, sent, retried."""
        governed = await self._engine.governor.call(
            prepared.plan.request,
            call.transport,
            ledger=self._state.ledger,
            price=model.prices,
            limits=prepared.server.limits,
            tally=tally,
            call_id=call.call_id,  # so that its call.retry events name the call
            plan=prepared.plan,
            encoded=prepared.encoded,
        )
        return governed.completion

    async def _hedged(
        self,
        call: _Call,
        copy: Callable[[CallTally], Awaitable[Completion]],
        tally: CallTally,
        hedged: list[HedgeSummary],
    ) -> Completion:
        """The hedger's race of governed copies inside this one logical call."""
        assert call.hedge is not None
        hedger, slot = call.hedge
        completion, summary = await hedger.race(slot, call.call_id, copy, tally)
        if summary is not None:
            hedged.append(summary)
        return completion

    async def _fit(
        self, request: ModelRequest, server: ServerSettings, transport: Transport, bound: int, guess: int
    ) -> Fitted:
        """Refuse a prompt that cannot fit the window, cut `max_tokens` to what fits, and
        count the prompt with the server's tokenizer where a window or a budget cap needs it."""
        governor = self._engine.governor
        capped = any(
            ledger.limits.max_usd is not None
            or ledger.limits.max_input_tokens is not None
            or ledger.limits.max_total_tokens is not None
            for ledger in self._state.ledger.chain()
        )
        return await fit(
            request,
            server,
            transport,
            bound=bound,
            guess=guess,
            default_max_tokens=governor.config.default_max_tokens,
            count_for_budget=capped,
        )

    def _record(
        self,
        call: _Call,
        started: float,
        status: CallStatus,
        *,
        usage: Usage = _NO_USAGE,
        cost: float = 0.0,
        attempts: int,
        from_journal: bool = False,
        error: str | None = None,
        text: str | None = None,
        hedge: HedgeSummary | None = None,
        usage_estimated: bool = False,
    ) -> None:
        """Record a finished call (paid, failed, refused or cancelled): nothing is lost."""
        node = call.node
        assert node.parent_id is not None
        record = CallRecord(
            call_id=call.call_id,
            node_id=node.node_id,
            parent_id=node.parent_id,
            depth=node.depth,
            kind=call.kind,
            model=call.request.model,
            started_at=started,
            finished_at=self._engine.clock(),
            status=status,
            usage=usage,
            cost_usd=cost,
            attempts=attempts,
            from_journal=from_journal,
            error=error,
            hedge=hedge,
            usage_estimated=usage_estimated,
        )
        self._state.records.append(record)
        self._state.tree.close(node, status, error)
        _events.emit(
            _events.CallFinish,
            call_id=call.call_id,
            status=status,
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens,
            cost_usd=cost,
            latency_s=record.latency_s,
            attempts=attempts,
            from_journal=from_journal,
            error=error,
            text=text if self._log_text else None,
        )


def _status_of(exc: BaseException) -> CallStatus:
    if isinstance(exc, BudgetExceeded):
        return "budget"
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        return "cancelled"
    return "error"
