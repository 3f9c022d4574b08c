"""The batch's dollar and token cap across a cluster: per actor, a lease it may commit
up to, grown in blocks on request and shrunk when the actor hands back what it does not
need.

An actor's lease is an upper bound of what it may have committed (spent, or reserved by
calls in flight, which may be paid). So the cap holds if the leases of live actors plus
what finished actors reported stay within it; a block is granted only from what is left
after that. An actor that dies keeps its lease on the books, counted as spent in full: it
may have paid up to it, and no one can say it did not. Actors keep leases small (what their
running queries are estimated to hold, handed back as queries finish), so that is little.

Pure bookkeeping; the coordinator actor wraps it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from ..exceptions import ConfigError

__all__ = ["BudgetBook", "Held"]


@dataclass(slots=True)
class Held:
    """One actor's lease: what it may commit, and what it reported spent."""

    usd: Decimal = field(default_factory=Decimal)
    tokens: int = 0
    spent_usd: Decimal = field(default_factory=Decimal)
    spent_tokens: int = 0
    dead: bool = False


class BudgetBook:
    """Caps (`None`: none) less what earlier runs spent, and every actor's lease."""

    def __init__(
        self, cap_usd: float | None, cap_tokens: int | None, *, spent_before: tuple[float, int] = (0.0, 0)
    ) -> None:
        for name, cap in (("usd", cap_usd), ("tokens", cap_tokens)):
            if cap is not None and cap < 0:
                raise ConfigError(f"a batch {name} cap of {cap} cannot hold; use >= 0 or none")
        self.cap_usd = None if cap_usd is None else Decimal(str(cap_usd))
        self.cap_tokens = cap_tokens
        self.before_usd = Decimal(str(spent_before[0]))
        self.before_tokens = spent_before[1]
        self.actors: dict[str, Held] = {}
        self.grants = 0
        self.refusals = 0

    def _committed(self) -> tuple[Decimal, int]:
        usd = self.before_usd + sum((h.usd for h in self.actors.values()), Decimal(0))
        return usd, self.before_tokens + sum(h.tokens for h in self.actors.values())

    def left(self) -> tuple[Decimal | None, int | None]:
        """What may still be leased, per capped dimension."""
        usd, tokens = self._committed()
        return (
            None if self.cap_usd is None else max(self.cap_usd - usd, Decimal(0)),
            None if self.cap_tokens is None else max(self.cap_tokens - tokens, 0),
        )

    def grow(self, actor: str, usd: Decimal, tokens: int) -> tuple[Decimal, int]:
        """Grant `actor` all of a block (`usd`, `tokens` more) or nothing: returns the
        actor's whole lease afterwards. An uncapped dimension is granted as asked."""
        held = self.actors.setdefault(actor, Held())
        left_usd, left_tokens = self.left()
        if (left_usd is not None and usd > left_usd) or (left_tokens is not None and tokens > left_tokens):
            self.refusals += 1
            return held.usd, held.tokens
        held.usd += usd
        held.tokens += tokens
        self.grants += 1
        return held.usd, held.tokens

    def shrink(
        self, actor: str, *, keep_usd: Decimal, keep_tokens: int, spent_usd: Decimal, spent_tokens: int
    ) -> None:
        """`actor` hands back all but `keep_*` (at least what it committed) and reports what
        it spent so far."""
        held = self.actors.setdefault(actor, Held())
        held.usd = min(held.usd, max(keep_usd, spent_usd))
        held.tokens = min(held.tokens, max(keep_tokens, spent_tokens))
        held.spent_usd, held.spent_tokens = spent_usd, spent_tokens

    def died(self, actor: str) -> None:
        """`actor` is gone: its lease stays counted in full (it may have paid up to it)."""
        held = self.actors.get(actor)
        if held is not None:
            held.dead = True

    def snapshot(self) -> dict[str, float | int | None]:
        usd, tokens = self._committed()
        return {
            "cap_usd": None if self.cap_usd is None else float(self.cap_usd),
            "cap_tokens": self.cap_tokens,
            "leased_usd": float(usd - self.before_usd),
            "leased_tokens": tokens - self.before_tokens,
            "reported_spent_usd": float(sum((h.spent_usd for h in self.actors.values()), Decimal(0))),
            "grants": self.grants,
            "refusals": self.refusals,
            "dead_actors": sum(h.dead for h in self.actors.values()),
        }
