"""The batch's budget: one ledger for the whole batch, and an admission policy in front of it.

Two layers, each doing one job:

* **The cap** is a `BudgetLedger` ("batch") under the governor's process ledger. Every
  query's ledger chains to it (query -> lease -> batch -> process), so every model call of
  every query reserves its upper bound in the batch ledger before it is sent: committed
  spend never crosses the cap, whatever the estimates below say. That is the guarantee.
* **Admission** decides whether a query may *start*: only when the cap can cover, besides
  what is committed, the rest of every running query's estimate and this query's own. A
  query that is refused while others run waits for one to finish (refining the estimate);
  refused with nothing running, it gets a `not_started` row. So near the cap the batch stops
  starting queries instead of starting ones it would have to cut off halfway.

The estimate (`CostEstimator`) starts from the context's size and the configuration (a
prior) and is scaled by what finished queries actually cost relative to their priors (the
largest recent ratio, plus a margin). With a per-query cap (`RLMConfig.budget`) the
estimate never exceeds it, and since a query's ledger never commits more than its cap,
admission is then exact: no admitted query is ever cut off by the batch cap.

A `Lease` is what an admitted query holds: its estimate and a ledger (no caps of its own)
that sees every charge of the query; the outstanding part of the lease is its estimate less
what the query has committed. Leases are the seam the distributed runner builds on: a
coordinator can hand them out to workers.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from .._config import RLMConfig
from .._governor import BudgetLedger, BudgetLimits, Charge, LedgerLog, PriceTable
from .._prompts import root_system_prompt, sub_system_prompt
from .._types import Usage
from ..exceptions import ConfigError

__all__ = ["AdmissionRefused", "BatchBudget", "CostEstimator", "Lease"]

_DIMS = ("usd", "total_tokens")
"""What a batch caps: dollars and total tokens."""
_ROOT_TURNS = 4
"""Root turns a query is assumed to take before any query finished (peek, fan out, answer...)."""
_SUB_CHUNK_TOKENS = 8_000
"""Context tokens per sub-call assumed by the prior."""


def _dim(c: Charge, dim: str) -> Decimal:
    return Decimal(c.dim(dim))


def _committed(ledger: BudgetLedger, dim: str) -> Decimal:
    """Spent plus reserved in one dimension."""
    if dim == "usd":
        return ledger.spent_usd + ledger.reserved_usd
    return Decimal(ledger.spent.total_tokens + ledger.reserved.total_tokens)


def _peak(ledger: BudgetLedger, dim: str) -> Decimal:
    return ledger.peak_committed_usd if dim == "usd" else Decimal(ledger.peak_committed_tokens)


def _cap(limits: BudgetLimits, dim: str) -> Decimal | None:
    value = getattr(limits, f"max_{dim}")
    return None if value is None else Decimal(str(value))


def spent_charge(ledger: BudgetLedger) -> Charge:
    """What a ledger has spent, as a `Charge`."""
    return Charge(ledger.spent, ledger.spent_usd)


class CostEstimator:
    """What a query is expected to hold of the batch budget at its peak, before it starts:
    a prior from its context size and the configuration, scaled by what finished queries
    held against their priors.

    The peak, not the final cost: every model call reserves its upper bound (prompt bound
    plus the full `max_tokens`) until it settles, and a fan-out reserves all its calls at
    once, so a query commits several times what it ends up spending. An estimate, not a
    bound: the per-call reservations are the bound."""

    def __init__(
        self,
        config: RLMConfig,
        prices: PriceTable,
        *,
        chars_per_token: float | None = None,
        margin: float = 1.25,
        window: int = 200,
    ) -> None:
        self._config = config
        self._prices = prices
        self._cpt = chars_per_token or config.governor.chars_per_token or 4.0
        self.margin = margin
        """Multiplies the learnt ratio: room for a query a little dearer than any seen."""
        self._ratios: dict[str, deque[Decimal]] = {d: deque(maxlen=window) for d in _DIMS}
        self._observed = 0
        self._root_system = math.ceil(len(root_system_prompt()) / self._cpt)
        self._sub_system = math.ceil(len(sub_system_prompt()) / self._cpt)

    @property
    def observed(self) -> int:
        """Finished queries the estimate has learnt from."""
        return self._observed

    def prior(self, context_chars: int, query_chars: int) -> Charge:
        """From sizes and configuration alone: a few root turns that each resend the
        system prompt, the query and a growing history, and sub-calls that read the whole
        context once, every call reserved with its model's full `max_tokens` as if all
        were in flight together."""
        cfg = self._config
        default_out = cfg.governor.default_max_tokens
        root, sub = cfg.model_for_depth(0), cfg.model_for_depth(1)
        root_out = root.max_tokens or default_out
        sub_out = sub.max_tokens or default_out
        turns = min(cfg.max_iterations, _ROOT_TURNS)
        query_tokens = math.ceil(query_chars / self._cpt)
        root_in = sum(self._root_system + query_tokens + 200 + t * root_out // 4 for t in range(turns))
        context_tokens = math.ceil(context_chars / self._cpt)
        subs = max(1, math.ceil(context_tokens / _SUB_CHUNK_TOKENS))
        sub_in = context_tokens + subs * (self._sub_system + query_tokens + 100)
        usd = self._prices.reserve_cost(
            root.model, root_in, turns * root_out, override=root.prices
        ) + self._prices.reserve_cost(sub.model, sub_in, subs * sub_out, override=sub.prices)
        return Charge(Usage(root_in + sub_in, turns * root_out + subs * sub_out, calls=turns + subs), usd)

    def estimate(self, prior: Charge) -> dict[str, Decimal]:
        """Per capped dimension: the prior scaled by the largest peak/prior ratio seen
        (times the margin), never above a per-query cap (a query's ledger never commits
        more than its cap)."""
        values = {d: _dim(prior, d) for d in _DIMS}
        margin = Decimal(str(self.margin))
        for d in _DIMS:
            ratios = self._ratios[d]
            if ratios:
                values[d] = values[d] * max(ratios) * margin
            cap = _cap(self._config.budget, d)
            if cap is not None:
                values[d] = min(values[d], cap)
        return values

    def observe(self, prior: Charge, peak: dict[str, Decimal]) -> None:
        """Learn from a query that ran: the most it held at once (for one cut short by a
        budget, a lower bound of what it needed)."""
        self._observed += 1
        for d in _DIMS:
            p = _dim(prior, d)
            if p > 0:
                self._ratios[d].append(peak[d] / p)


@dataclass(frozen=True, slots=True)
class AdmissionRefused:
    """Why a query may not start: the cap, what is committed and held, what it needs."""

    limit: str
    cap: float
    committed: float
    """Spent and reserved in the batch ledger, plus running queries' outstanding estimates."""
    requested: float

    def __str__(self) -> str:
        if self.limit.endswith("usd"):
            return (
                f"{self.limit} cap ${self.cap:,.4f}: ${self.committed:,.4f} committed or held by running "
                f"queries, this query is estimated to hold up to ${self.requested:,.4f}"
            )
        return (
            f"{self.limit} cap {self.cap:,.0f}: {self.committed:,.0f} committed or held by running "
            f"queries, this query is estimated to hold up to {self.requested:,.0f}"
        )


class Lease:
    """An admitted query's share of the batch budget. Close it exactly once."""

    __slots__ = ("_budget", "closed", "estimate", "ledger", "prior")

    def __init__(self, budget: BatchBudget, prior: Charge, estimate: dict[str, Decimal]) -> None:
        self._budget = budget
        self.prior = prior
        self.estimate = estimate
        self.ledger = BudgetLedger(parent=budget.ledger, name="lease")
        """No caps of its own: it sees every charge of the query, for `outstanding`."""
        self.closed = False

    def outstanding(self, dim: str) -> Decimal:
        """What the query may still commit, by its estimate."""
        return max(self.estimate[dim] - _committed(self.ledger, dim), Decimal(0))

    def close_after(self, status: str, *, journal_hits: int) -> None:
        """The query ran and ended with `status`. A query cut short by a budget needed at
        least its lease; one that replayed calls from the journal (a resumed batch) cost
        less than a fresh query will, so it teaches nothing: learning from it would shrink
        the estimate and admit queries the cap then cuts off."""
        cut_short = status == "budget_exceeded"
        self.close(learn=cut_short or journal_hits == 0, cut_short=cut_short)

    def close(self, *, learn: bool, cut_short: bool = False) -> None:
        """The query ended; `learn`: it ran, so what it held teaches the estimator;
        `cut_short`: a budget refused some of its calls, so it needed more than it held,
        and more than its lease: the lesson is at least the lease."""
        if self.closed:
            return
        self.closed = True
        self._budget._leases.discard(self)
        if learn:
            peak = {d: _peak(self.ledger, d) for d in _DIMS}
            if cut_short:
                peak = {d: max(peak[d], self.estimate[d]) for d in _DIMS}
            self._budget.estimator.observe(self.prior, peak)


class BatchBudget:
    """The batch ledger and the admission policy. Synchronous, so cancellation-safe."""

    def __init__(
        self,
        limits: BudgetLimits | None,
        estimator: CostEstimator,
        *,
        parent: BudgetLedger | None = None,
        spent_before: Charge | None = None,
        log: LedgerLog | None = None,
    ) -> None:
        """`spent_before`: what earlier runs of this batch already spent (or may have: see
        `SpendLog`); it counts against the caps, which this run sees lowered by that much.
        `log`: persists the batch ledger's books (the `SpendLog` beside an output file)."""
        limits = limits or BudgetLimits()
        others = [
            f"max_{d}"
            for d in ("input_tokens", "output_tokens", "calls", "seconds")
            if getattr(limits, f"max_{d}") is not None
        ]
        if others:
            raise ConfigError(
                f"a batch budget caps max_usd and max_total_tokens; {others} apply per query (RLMConfig.budget)"
            )
        self.limits = limits
        self.spent_before = spent_before or Charge()
        lowered: dict[str, Any] = {}
        for d in _DIMS:
            cap = _cap(limits, d)
            if cap is not None:
                left = max(cap - _dim(self.spent_before, d), Decimal(0))
                lowered[f"max_{d}"] = float(left) if d == "usd" else int(left)
        self.ledger = BudgetLedger(replace(limits, **lowered), parent=parent, name="batch", log=log)
        self.estimator = estimator
        self._leases: set[Lease] = set()
        self.last_refusal: AdmissionRefused | None = None

    @property
    def running(self) -> int:
        return len(self._leases)

    def admit(self, prior: Charge) -> Lease | None:
        """A lease for a query whose prior is `prior`, or `None` (and `last_refusal` says
        why) when the caps cannot cover it on top of what is committed and held.

        Before any query has finished there is nothing to learn from, and the prior may be
        far off: a query whose estimate does not fit then still starts if nothing else runs,
        alone, holding all that is left, so the estimate can be learnt. It can be cut off
        only if it needs more than the whole remaining budget."""
        estimate = self.estimator.estimate(prior)
        probe = self.estimator.observed == 0 and not self._leases
        for d in _DIMS:
            cap = _cap(self.ledger.limits, d)
            if cap is None:
                continue
            held = _committed(self.ledger, d) + sum(
                (lease.outstanding(d) for lease in self._leases), Decimal(0)
            )
            wanted = estimate[d]
            if held + wanted > cap:
                if probe and held < cap:
                    estimate[d] = cap - held
                    continue
                before = _dim(self.spent_before, d)
                self.last_refusal = AdmissionRefused(
                    f"batch.{d}", float(cap + before), float(held + before), float(wanted)
                )
                return None
        lease = Lease(self, prior, estimate)
        self._leases.add(lease)
        return lease

    def spent(self) -> Charge:
        """This run's spend plus `spent_before`."""
        return spent_charge(self.ledger) + self.spent_before

    def held(self, dim: str) -> Decimal:
        """What admission counts as taken in `dim` ("usd" or "total_tokens"): committed in
        the batch ledger plus what running queries may still commit, by their estimates."""
        return _committed(self.ledger, dim) + sum(
            (lease.outstanding(dim) for lease in self._leases), Decimal(0)
        )
