"""Rate leases, paced so that the whole cluster stays within a per-minute limit in every
window of `window_s` seconds, however the leases are spent.

A coordinator grants blocks of requests (or tokens) from a bucket of capacity `burst` that
refills at `rate` a second; a holder may spend a grant only until `ttl_s` after it asked
for it, and unspent grants lapse (they are never handed back to the bucket: a grant's
time has passed). So whatever is spent inside a window `[a, a + W]` was granted inside
`[a - ttl, a + W]`, which is at most `burst + rate * (W + ttl)`. Choosing

    rate = (limit * W / 60 - burst) / (W + ttl)

keeps that at or under `limit * W / 60`: the server never sees more than its limit's share
of any window. The price is throughput: the cluster gets `rate * 60 / limit` of the limit
(about 75% for a 10-second window, a 2-second lease and a burst of a tenth of the window),
and the shorter the leases the closer to all of it. Pure bookkeeping: time is passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..exceptions import ConfigError

__all__ = ["PacedGrants", "Pacing"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Pacing:
    """How one per-minute limit is paced across a cluster."""

    limit_per_minute: float
    window_s: float = 10.0
    """The window the limit must hold in (the proof checks every 10-second window)."""
    ttl_s: float = 2.0
    """How long a holder may spend a grant, counted from when it asked."""
    burst_share: float = 0.1
    """The bucket's capacity, as a share of one window's allowance."""

    def __post_init__(self) -> None:
        if not self.limit_per_minute > 0:
            raise ConfigError(f"a per-minute limit of {self.limit_per_minute} cannot be paced; use > 0")
        if not (self.window_s > 0 and self.ttl_s > 0 and 0 < self.burst_share < 1):
            raise ConfigError(
                f"pacing needs window_s > 0, ttl_s > 0 and 0 < burst_share < 1 "
                f"(got {self.window_s}, {self.ttl_s}, {self.burst_share})"
            )

    @property
    def per_window(self) -> float:
        return self.limit_per_minute * self.window_s / 60.0

    @property
    def burst(self) -> float:
        return self.per_window * self.burst_share

    @property
    def rate(self) -> float:
        """Units a second the coordinator grants at most, on average."""
        return (self.per_window - self.burst) / (self.window_s + self.ttl_s)

    @property
    def share_of_limit(self) -> float:
        """What fraction of the limit the cluster can use (the price of the bound)."""
        return self.rate * 60.0 / self.limit_per_minute


class PacedGrants:
    """The coordinator's bucket for one limit (requests or tokens of one endpoint+model)."""

    def __init__(self, pacing: Pacing, *, now: float) -> None:
        self.pacing = pacing
        self.level = pacing.burst
        self._updated = now
        self.granted = 0.0
        """Everything granted so far."""
        self.grants = 0

    def _refill(self, now: float) -> None:
        if now > self._updated:
            self.level = min(self.pacing.burst, self.level + (now - self._updated) * self.pacing.rate)
            self._updated = now

    def largest(self) -> int:
        """The most one grant can ever be: a single need above it can never be met."""
        return math.floor(self.pacing.burst)

    def grant(self, want: int, *, at_least: int, now: float) -> int:
        """Up to `want` units, if at least `at_least` are there now; else 0."""
        self._refill(now)
        if self.level < at_least:
            return 0
        n = min(want, math.floor(self.level))
        self.level -= n
        self.granted += n
        self.grants += 1
        return n

    def wait_s(self, amount: int, *, now: float) -> float:
        """How long until `amount` units are there."""
        self._refill(now)
        return max(0.0, (amount - self.level) / self.pacing.rate)
