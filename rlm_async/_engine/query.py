"""One query: the root RLM node under the query's deadline, how the run ended, and the
result assembled from the query's state — partial when the run ended early."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import anyio

from .. import _events
from .._context import Context
from .._descriptors import connection_budget
from .._governor import BudgetLedger
from .._prompts import describe_context
from .._result import RLMResult
from .._tree import CallTree
from .._types import Usage
from ..exceptions import BudgetExceeded, ConfigError
from ..logger import RLMLogger
from .calls import CallPath
from .outcome import RunEnded, RunOutcome
from .session import SessionState
from .state import QueryState
from .turns import RLMLoop

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["Query"]


class Query:
    """The root of one `acompletion`: wires the state, the call path and the turn loop."""

    def __init__(
        self,
        engine: Engine,
        *,
        query_id: str,
        ledger_parent: BudgetLedger | None = None,
        session: SessionState | None = None,
        logger: RLMLogger | None = None,
    ) -> None:
        self._engine = engine
        self._config = engine.config
        self.state = QueryState(
            query_id=query_id,
            tree=CallTree(engine.clock),
            ledger=engine.governor.ledger(self._config.budget, parent=ledger_parent),
        )
        self._loop = RLMLoop(engine, self.state, CallPath(engine, self.state), logger=logger)
        self._session = session

    def check_prices(self) -> None:
        """A dollar cap needs a price for every model the tree may call. Refused here, before
        any work: found later by the governor inside a fan-out, the same ConfigError would
        reach the caller wrapped in an ExceptionGroup from the sub-call task group."""
        if not self.state.ledger.caps_usd:
            return
        prices = self._engine.governor.prices
        unpriced = sorted(
            {m.model for m in self._config.all_models() if not prices.is_priced(m.model, m.prices)}
        )
        if unpriced:
            raise ConfigError(
                f"a dollar budget is set but no price is known for model(s) {unpriced}, so it could not "
                "be enforced: give each a ModelPrice (ModelPrice.free() for a self-hosted model)"
            )

    async def run(self, context: Context, root_prompt: str | None) -> RLMResult:
        clock = self._engine.clock
        started = clock()
        meta = describe_context(context)
        connections = connection_budget()
        _events.emit(
            _events.QueryStart,
            context_type=meta.type_name,
            context_chars=meta.total_length,
            root_prompt_chars=len(root_prompt or ""),
            max_depth=self._config.max_depth,
            budget_usd=self._config.budget.max_usd,
            # The most requests this process holds in flight at once, and where it comes from.
            max_in_flight=connections.connections,
            max_in_flight_why=connections.why,
        )
        outcome = RunOutcome(None, "ok")
        deadline = self._config.budget.max_seconds
        with anyio.move_on_after(math.inf if deadline is None else deadline) as scope:
            try:
                outcome = await self._loop.run(
                    context, root_prompt, depth=0, parent=None, session=self._session
                )
            except RunEnded as ended:
                outcome = ended.outcome
            except anyio.get_cancelled_exc_class():
                if not scope.cancel_called:  # cancelled from outside: say so, then let it propagate
                    _events.emit(_events.QueryFinish, status="cancelled", wall_s=clock() - started)
                raise
        if scope.cancelled_caught:
            outcome = RunOutcome(
                None,
                "timeout",
                f"deadline of {deadline:g} s reached; the run was cancelled and its workers killed",
                "seconds",
            )
        result = self._result(self._with_refusals(outcome), clock() - started, root_prompt)
        _events.emit(
            _events.QueryFinish,
            status=result.status,
            wall_s=result.execution_time,
            calls=result.total.calls,
            prompt_tokens=result.total.prompt_tokens,
            cached_tokens=result.total.cached_tokens,
            completion_tokens=result.total.completion_tokens,
            cost_usd=result.total.cost_usd,
        )
        return result

    def _with_refusals(self, outcome: RunOutcome) -> RunOutcome:
        """The model answered, but without some sub-calls it asked for: never a silent "ok".
        Refused by the budget (or at admission): "budget_exceeded"; failed: "partial"."""
        if outcome.status not in ("ok", "max_iterations"):
            return outcome
        state = self.state
        refused = sum(1 for r in state.records if r.status == "budget") + sum(state.unsent.values())
        failed = len(state.failures)
        if refused:
            last = state.ledger.last_refusal
            why = last if last is not None else state.last_unsent
            detail = (
                f"{refused} call(s) were refused by the budget"
                + (f" ({why})" if why is not None else "")
                + "; the model answered without their results, so the answer may be incomplete"
            )
            limit = why.limit if isinstance(why, BudgetExceeded) else None
            return RunOutcome(outcome.answer, "budget_exceeded", detail, limit)
        if not failed:
            return outcome
        first = state.failures[0].error
        detail = (
            f"{failed} sub-call(s) failed (the first: {first[:300]}); the model answered without their "
            "results, so the answer may be incomplete"
        )
        if outcome.status == "max_iterations":
            return RunOutcome(outcome.answer, "max_iterations", f"{outcome.detail}; {detail}", outcome.limit)
        return RunOutcome(outcome.answer, "partial", detail)

    def _result(self, outcome: RunOutcome, wall: float, root_prompt: str | None) -> RLMResult:
        state = self.state
        by_model: dict[str, Usage] = {}
        by_depth: dict[int, Usage] = {}
        total = Usage()
        for r in state.records:
            by_model[r.model] = by_model.get(r.model, Usage()) + r.totals
            by_depth[r.depth] = by_depth.get(r.depth, Usage()) + r.totals
            total += r.totals
        for (model, depth), count in state.unsent.items():  # refused at admission: not calls
            unsent = Usage(refused_calls=count)
            by_model[model] = by_model.get(model, Usage()) + unsent
            by_depth[depth] = by_depth.get(depth, Usage()) + unsent
            total += unsent
        return RLMResult(
            response=outcome.answer,
            status=outcome.status,
            detail=outcome.detail,
            root_model=self._config.model_for_depth(0).model,
            prompt=root_prompt,
            execution_time=wall,
            iterations=state.iterations,
            calls=list(state.records),
            nodes=[n.to_dict() for n in state.tree.nodes.values()],
            failures=list(state.failures),
            subcall_results=list(state.subcall_results),
            by_model=by_model,
            by_depth=by_depth,
            total=total,
            limit_hit=outcome.limit,
            isolation=state.isolation,
            failed_subcalls=len(state.failures)
            + sum(1 for r in state.records if r.status == "budget" and r.kind == "sub")
            + sum(state.unsent.values()),
            usage_estimated=any(r.usage_estimated for r in state.records),
        )
