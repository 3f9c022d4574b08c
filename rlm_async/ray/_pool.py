"""An actor's local stock of rate leases, and the transport that spends it: the hot path
takes a request and its tokens from the stock, and only when the stock runs dry does it
ask the endpoint's coordinator for a block (one round trip per block, never per call).

Each grant may be spent until `ttl_s` after it was asked for (plus the time it waited in
the coordinator); what is left then lapses (see `_pacing.py` for why that keeps every
window within the limit). A request's tokens are its prompt bound (the governor's budget
estimator, an upper bound) plus `max_tokens`, what OpenAI-style TPM meters count; after
the response, what the server counted less than that goes back into the stock.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from .._governor import RequestTooLarge
from .._governor._estimate import TokenEstimator
from .._types import Completion, ModelRequest
from ..transport import ProbeResponse, Transport

__all__ = ["LeasePool", "LeasedTransport", "RateSource"]


class RateSource(Protocol):
    """The coordinator as the pool sees it (a Ray actor handle, or the class in-process)."""

    def __call__(self, model: str, dim: str, want: int, at_least: int) -> Awaitable[tuple[int, float]]: ...


@dataclass(slots=True)
class _Grant:
    left: int
    expires: float


@dataclass(slots=True)
class _Stock:
    """One model's requests or tokens."""

    grants: list[_Grant] = field(default_factory=list)
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    """One block fetched at a time; the others wait for it."""
    want: int = 1
    """Block size asked for: grows while the stock keeps running dry."""

    lapsed: int = 0
    """Units that expired unspent."""
    lapsed_at_fetch: int = 0
    """`lapsed` when the last block was fetched: more since means blocks are too big."""
    fetches: int = 0

    def available(self, now: float) -> int:
        live = [g for g in self.grants if g.expires > now]
        self.lapsed += sum(g.left for g in self.grants if g.expires <= now)
        self.grants = live  # spent-out grants stay until they expire: a refund may land in one
        return sum(g.left for g in self.grants)

    def spend(self, n: int) -> list[tuple[_Grant, int]]:
        taken: list[tuple[_Grant, int]] = []
        for g in sorted(self.grants, key=lambda g: g.expires):
            k = min(n, g.left)
            if k:
                g.left -= k
                taken.append((g, k))
                n -= k
            if not n:
                break
        return taken


@dataclass(slots=True)
class Ticket:
    """What one request took, so that an unused part can go back."""

    tokens: list[tuple[_Grant, int]]
    reserved_tokens: int


class LeasePool:
    """One actor's stock of rate leases, for every limited (model, dimension)."""

    def __init__(
        self,
        source: RateSource,
        limited: Mapping[tuple[str, str], int],
        *,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`limited`: for each limited (model, dim), the largest grant the coordinator can
        make (a need above it can never be met)."""
        self._source = source
        self._largest = dict(limited)
        self._ttl = ttl_s
        self._clock = clock
        self._stock: dict[tuple[str, str], _Stock] = {k: _Stock() for k in limited}
        self.round_trips = 0

    def lapsed(self) -> dict[str, int]:
        """Units granted but expired unspent, per dimension."""
        out: dict[str, int] = {}
        for (_, dim), stock in self._stock.items():
            stock.available(self._clock())
            out[dim] = out.get(dim, 0) + stock.lapsed
        return out

    async def take(self, model: str, tokens: int) -> Ticket:
        await self._take(model, "requests", 1)
        taken = await self._take(model, "tokens", tokens)
        return Ticket(taken, tokens)

    def give_back(self, ticket: Ticket, counted_tokens: int) -> None:
        """The server counted `counted_tokens`: return the rest to the grants it came from."""
        extra = ticket.reserved_tokens - counted_tokens
        for grant, k in reversed(ticket.tokens):
            if extra <= 0:
                break
            back = min(k, extra)
            grant.left += back
            extra -= back

    async def _take(self, model: str, dim: str, n: int) -> list[tuple[_Grant, int]]:
        stock = self._stock.get((model, dim))
        if stock is None:
            return []
        largest = self._largest[(model, dim)]
        if n > largest:
            raise RequestTooLarge(
                f"this request needs {n:,} {dim} but the cluster's paced lease for {model!r} holds at "
                f"most {largest:,}; raise the limit or send a smaller prompt or lower max_tokens"
            )
        while True:
            if stock.available(self._clock()) >= n:
                return stock.spend(n)
            async with stock.lock:
                now = self._clock()
                if stock.available(now) >= n:
                    continue
                # Grants lapsed since the last block: blocks are too big for this actor's
                # pace, halve; otherwise the stock ran dry in use: double (fewer round
                # trips), up to the largest grant.
                if stock.lapsed > stock.lapsed_at_fetch:
                    stock.want = max(1, stock.want // 2)
                elif stock.fetches:
                    stock.want = min(largest, stock.want * 2)
                stock.lapsed_at_fetch = stock.lapsed
                stock.fetches += 1
                want = min(largest, max(n, stock.want))
                stock.want = want
                asked = self._clock()
                self.round_trips += 1
                granted, waited = await self._source(model, dim, want, n)
                if granted < n:  # only for a need above what the coordinator can grant
                    raise RequestTooLarge(f"the coordinator cannot grant {n:,} {dim} of {model!r}")
                stock.grants.append(_Grant(granted, asked + waited + self._ttl))


class LeasedTransport(Transport):
    """A transport whose every request first takes its rate lease from the pool."""

    def __init__(self, inner: Transport, pool: LeasePool, estimator: TokenEstimator) -> None:
        self._inner = inner
        self._pool = pool
        self._estimator = estimator
        self.endpoint = inner.endpoint

    async def complete(self, request: ModelRequest) -> Completion:
        tokens = self._estimator.prompt_tokens(request) + (request.max_tokens or 0)
        ticket = await self._pool.take(request.model, tokens)
        completion = await self._inner.complete(request)
        usage = completion.usage
        if usage.prompt_tokens:
            self._pool.give_back(ticket, usage.prompt_tokens + (request.max_tokens or 0))
        return completion

    async def probe(
        self, method: str, url: str, body: Mapping[str, Any] | None = None, *, timeout_s: float = 5.0
    ) -> ProbeResponse | None:
        return await self._inner.probe(method, url, body, timeout_s=timeout_s)

    async def aclose(self) -> None:
        await self._inner.aclose()
