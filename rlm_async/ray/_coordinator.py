"""The coordinator actors' classes: one `Coordinator` per endpoint hands out rate leases
for its models; one `BudgetKeeper` per batch leases the batch's dollars and tokens.

Plain classes: the driver wraps them with `ray.remote` and pins them to its own node (the
node whose loss ends the batch anyway, since it owns the output file). Async methods, so a
Ray async actor serves many waiting actors at once; a lease that must wait for the pacing
bucket waits here, in the coordinator, rather than being polled for.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal

import anyio

from ._budget_book import BudgetBook
from ._pacing import PacedGrants, Pacing

__all__ = ["BudgetKeeper", "Coordinator", "RateLimitsByModel"]

RateLimitsByModel = Mapping[str, tuple[float | None, int | None]]
"""Per model: (requests per minute, tokens per minute); `None` leaves one unlimited."""


class Coordinator:
    """Rate leases for the models of one endpoint, paced per `_pacing.py`."""

    def __init__(
        self,
        endpoint: str,
        limits: RateLimitsByModel,
        *,
        window_s: float = 10.0,
        ttl_s: float = 2.0,
        burst_share: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.endpoint = endpoint
        self.ttl_s = ttl_s
        self._clock = clock
        self._sleep = sleep
        now = clock()
        self._grants: dict[tuple[str, str], PacedGrants] = {}
        for model, (rpm, tpm) in limits.items():
            for dim, limit in (("requests", rpm), ("tokens", tpm)):
                if limit is not None:
                    pacing = Pacing(
                        limit_per_minute=limit, window_s=window_s, ttl_s=ttl_s, burst_share=burst_share
                    )
                    self._grants[(model, dim)] = PacedGrants(pacing, now=now)
        self.calls = 0
        """Round trips served (`take`), for the scale figures."""

    def limited(self) -> list[tuple[str, str]]:
        """The (model, dimension) pairs that have a limit."""
        return sorted(self._grants)

    def largest(self, model: str, dim: str) -> int | None:
        g = self._grants.get((model, dim))
        return None if g is None else g.largest()

    async def take(self, model: str, dim: str, want: int, at_least: int) -> tuple[int, float]:
        """Up to `want` units (at least `at_least`) of `model`'s `dim`, waiting for the
        pacing bucket; returns (granted, seconds waited here). Unlimited: `want` at once."""
        self.calls += 1
        grants = self._grants.get((model, dim))
        if grants is None:
            return want, 0.0
        if at_least > grants.largest():
            return 0, 0.0  # can never be granted; the pool turns this into RequestTooLarge
        started = self._clock()
        while True:
            now = self._clock()
            n = grants.grant(want, at_least=at_least, now=now)
            if n:
                return n, now - started
            await self._sleep(grants.wait_s(at_least, now=now))

    def stats(self) -> dict[str, object]:
        return {
            "endpoint": self.endpoint,
            "round_trips": self.calls,
            "limits": {
                f"{m}/{d}": {
                    "limit_per_minute": g.pacing.limit_per_minute,
                    "paced_share": round(g.pacing.share_of_limit, 4),
                    "burst": g.pacing.burst,
                    "granted": g.granted,
                    "grants": g.grants,
                    "mean_grant": round(g.granted / g.grants, 2) if g.grants else 0.0,
                }
                for (m, d), g in sorted(self._grants.items())
            },
        }


class BudgetKeeper:
    """The batch's dollar and token leases (`_budget_book.py`)."""

    def __init__(
        self, cap_usd: float | None, cap_tokens: int | None, spent_before: tuple[float, int] = (0.0, 0)
    ) -> None:
        self.book = BudgetBook(cap_usd, cap_tokens, spent_before=spent_before)
        self.calls = 0

    def grow(self, actor: str, usd: str, tokens: int) -> tuple[str, int]:
        """Dollars travel as decimal strings: no float rounding between ledgers."""
        self.calls += 1
        held_usd, held_tokens = self.book.grow(actor, Decimal(usd), tokens)
        return str(held_usd), held_tokens

    def shrink(self, actor: str, keep_usd: str, keep_tokens: int, spent_usd: str, spent_tokens: int) -> None:
        self.calls += 1
        self.book.shrink(
            actor,
            keep_usd=Decimal(keep_usd),
            keep_tokens=keep_tokens,
            spent_usd=Decimal(spent_usd),
            spent_tokens=spent_tokens,
        )

    def died(self, actor: str) -> None:
        self.book.died(actor)

    def stats(self) -> dict[str, object]:
        return {**self.book.snapshot(), "round_trips": self.calls}
