"""When to hedge: a pure decision over a fan-out's state, with no clock, task or I/O.

`HedgePolicy.decide` reads how many of the fan-out's sub-calls have finished, the age of
each running sub-call's newest copy (the caller's clock), the latencies this model showed in
earlier fan-outs, and how many more copies the caps allow; it returns which sub-calls get
one more copy now and when to ask again if nothing finishes before then. Three rules, each
named in the decision so traces can say why a hedge was sent:

- "stage": once a share `stages[k]` of the fan-out has finished, every sub-call still
  running may have `k + 2` copies (if older than `min_ratio` x the fan-out's median). A fan-out starts its calls together, so "90 % finished"
  is the censoring-free way to say "older than this fan-out's p90".
- "quantile": a sub-call with one copy, older than `quantile` of the latencies of earlier
  fan-outs (not this one: its finished calls are only its fast ones), gets a second.
- "straggler": after the last stage, a copy older than `straggler_factor` x the fan-out's
  median gets a fresh sibling (hedges have tails too).

Oldest first when the allowance is short.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .._config import HedgeConfig

__all__ = ["HedgeDecision", "HedgePolicy", "HedgeReason", "Running", "quantile"]

HedgeReason = Literal["stage", "quantile", "straggler"]


@dataclass(frozen=True, slots=True)
class Running:
    """A sub-call still running: its slot, copies sent so far, its newest copy's age, and
    its own age (since the original was sent; the newest copy's when omitted)."""

    slot: int
    copies: int
    newest_age_s: float
    age_s: float | None = None

    @property
    def call_age_s(self) -> float:
        return self.newest_age_s if self.age_s is None else self.age_s


@dataclass(frozen=True, slots=True)
class HedgeDecision:
    hedge: tuple[tuple[int, HedgeReason], ...] = ()
    """(slot, why) for each sub-call that gets one more copy now."""
    recheck_in_s: float | None = None
    """Ask again after this long if nothing finishes first; `None`: only when something does."""


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """The `q` quantile of sorted values (nearest rank); needs at least one value."""
    rank = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[rank]


class HedgePolicy:
    """The rules above for one `HedgeConfig`. Stateless: every input is an argument."""

    def __init__(self, config: HedgeConfig) -> None:
        self.config = config

    def allowance(self, total: int, sent: int) -> int:
        """More copies this fan-out may send, given `sent` already."""
        return max(1, math.floor(self.config.max_share * total)) - sent

    def first_stage_count(self, total: int) -> int:
        """Finished calls at which the first stage is reached (`total` if there is none):
        the least k with k / total >= stages[0], the test `may_hedge` makes."""
        cfg = self.config
        if not cfg.stages or total <= 0:
            return max(total, 0)
        k = min(total, math.ceil(cfg.stages[0] * total))
        while k > 0 and (k - 1) / total >= cfg.stages[0]:
            k -= 1
        while k < total and k / total < cfg.stages[0]:
            k += 1
        return k

    def may_hedge(self, *, total: int, finished: int, history_size: int) -> bool:
        """Whether any rule can fire yet: before the first stage, with too little history,
        `decide` would hedge nothing and need no ages (saves a scan of every running call)."""
        cfg = self.config
        past_stage = bool(cfg.stages) and total > 0 and finished / total >= cfg.stages[0]
        return past_stage or (cfg.quantile is not None and history_size >= cfg.min_samples)

    def decide(
        self,
        *,
        total: int,
        finished_latencies: Sequence[float],
        running: Sequence[Running],
        history: Sequence[float],
        allowance: int,
    ) -> HedgeDecision:
        """`finished_latencies`: this fan-out's finished sub-calls (sorted); `history`:
        latencies of this model's earlier fan-outs (sorted); `allowance`: copies the
        fan-out and process caps still allow."""
        cfg = self.config
        if not running or total <= 0:
            return HedgeDecision()
        finished = len(finished_latencies)
        share = finished / total
        stages_passed = bisect.bisect_right(cfg.stages, share)
        stage_copies = 1 + stages_passed if stages_passed else 0
        median = quantile(finished_latencies, 0.5) if finished_latencies else math.inf
        stage_cut = cfg.min_ratio * median
        history_cut = (
            max(quantile(history, cfg.quantile), cfg.min_ratio * quantile(history, 0.5))
            if cfg.quantile is not None and len(history) >= cfg.min_samples
            else math.inf
        )
        straggler_cut = math.inf
        if cfg.straggler_factor is not None and cfg.stages and stages_passed == len(cfg.stages):
            straggler_cut = max(cfg.straggler_factor, cfg.min_ratio) * median
        wanted: list[tuple[float, int, HedgeReason]] = []
        recheck = math.inf
        for r in running:
            if r.copies >= cfg.max_copies:
                continue
            # A stage judges the call's own age (its newest copy may be young: a stage adds
            # to calls an earlier stage hedged); the straggler rule judges the newest copy.
            if r.copies < stage_copies and r.call_age_s >= stage_cut:
                wanted.append((r.newest_age_s, r.slot, "stage"))
            elif r.copies == 1 and r.newest_age_s >= history_cut:
                wanted.append((r.newest_age_s, r.slot, "quantile"))
            elif r.newest_age_s >= straggler_cut:
                wanted.append((r.newest_age_s, r.slot, "straggler"))
            else:
                due = min(
                    stage_cut - r.call_age_s if r.copies < stage_copies else math.inf,
                    history_cut - r.newest_age_s if r.copies == 1 else math.inf,
                    straggler_cut - r.newest_age_s,
                )
                recheck = min(recheck, due)
        wanted.sort(key=lambda w: -w[0])
        chosen = tuple((slot, why) for _, slot, why in wanted[: max(0, allowance)])
        if len(wanted) > len(chosen):
            return HedgeDecision(chosen, None)  # out of allowance: only a finish can change it
        return HedgeDecision(chosen, None if math.isinf(recheck) else max(recheck, 0.0))
