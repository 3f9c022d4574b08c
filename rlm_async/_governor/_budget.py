"""Budgets: reserve before a call, settle after it, so committed spend never crosses a cap.

A `BudgetLedger` counts one query's whole call tree (the engine hands the same ledger to
child RLMs); its optional `parent` (the process ledger) sees every charge too, and a
reservation must fit in every ledger up the chain.

    ledger = BudgetLedger(BudgetLimits(max_usd=1.00, max_total_tokens=50_000), parent=process)
    r = ledger.reserve(Charge(input_tokens=900, output_tokens=512, usd=Decimal("0.002"), calls=1),
                       model="gpt-5-mini", depth=1)     # raises BudgetExceeded: nothing is sent
    ...                                                   # the call
    ledger.settle(r, Charge.of_usage(usage, usd=cost))    # the truth; the rest is refunded

The guarantee: for every capped quantity, spent + reserved <= cap after every `reserve`
(checked and applied with no await in between, so concurrent tasks cannot both take the last
dollar). `settle` replaces a reservation by what the server reported; when that is no more
than what was reserved (the estimator is an upper bound, see `_estimate.py`), spent stays
<= cap. When a server reports more, the ledger records the truth, counts an overrun and
logs it: the bill is what it is. Everything here is synchronous and safe under cancellation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import structlog

from .._events import emit
from .._types import Usage
from ..exceptions import BudgetExceeded, ConfigError
from ._clock import Clock

__all__ = ["BudgetLedger", "BudgetLimits", "BudgetRemaining", "Charge", "Reservation", "Totals"]

_log = structlog.get_logger("rlm_async.governor")


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetLimits:
    """Caps for one query's call tree (children included) or for the whole process.

    Mirrors pydantic-ai's `UsageLimits`: each field `None` disables that cap; checked before
    every call (`check_before_request`), recorded after it. The official package's arguments
    map as `max_budget` -> `max_usd`, `max_tokens` -> `max_total_tokens`, `max_timeout` ->
    `max_seconds` (see `from_official`)."""

    max_usd: float | None = None
    """Dollars, priced by the governor's price table (cached input at the cached price)."""
    max_input_tokens: int | None = None
    """Prompt tokens as servers report them (cached ones included)."""
    max_output_tokens: int | None = None
    """Completion tokens (reasoning tokens included)."""
    max_total_tokens: int | None = None
    """Prompt plus completion tokens."""
    max_calls: int | None = None
    """Model calls sent, each retry attempt counted."""
    max_seconds: float | None = None
    """Wall-clock deadline for the query. Carried, not enforced here: the engine wraps the
    query in a cancel scope."""

    def __post_init__(self) -> None:
        for name in (
            "max_usd",
            "max_input_tokens",
            "max_output_tokens",
            "max_total_tokens",
            "max_calls",
            "max_seconds",
        ):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ConfigError(f"BudgetLimits.{name} is {value}; use a number >= 0, or None for no cap")

    @classmethod
    def from_official(
        cls,
        *,
        max_budget: float | None = None,
        max_tokens: int | None = None,
        max_timeout: float | None = None,
    ) -> BudgetLimits:
        """The official RLM package's `max_budget` / `max_tokens` / `max_timeout`."""
        return cls(max_usd=max_budget, max_total_tokens=max_tokens, max_seconds=max_timeout)

    @property
    def unlimited(self) -> bool:
        return all(
            getattr(self, n) is None
            for n in (
                "max_usd",
                "max_input_tokens",
                "max_output_tokens",
                "max_total_tokens",
                "max_calls",
                "max_seconds",
            )
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Charge:
    """An amount to reserve or to record: tokens, exact dollars, calls."""

    input_tokens: int = 0
    cached_tokens: int = 0
    """Of `input_tokens`, how many the provider served from its prefix cache."""
    output_tokens: int = 0
    usd: Decimal = Decimal(0)
    calls: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @classmethod
    def of_usage(cls, usage: Usage, *, usd: Decimal, calls: int = 1) -> Charge:
        return cls(
            input_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            output_tokens=usage.completion_tokens,
            usd=usd,
            calls=calls,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Totals:
    """What was spent: per ledger, per model, per depth."""

    calls: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "input_tokens": self.input_tokens,
            "cached_tokens": self.cached_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
            "cost_usd": self.cost_usd,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetRemaining:
    """What can still be reserved, the tightest over the ledger chain; `None` = no cap."""

    usd: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    calls: int | None = None
    seconds: float | None = None


class _Meter:
    """Mutable running sums (dollars exact)."""

    __slots__ = ("cached_tokens", "calls", "input_tokens", "output_tokens", "usd")

    def __init__(self) -> None:
        self.input_tokens = 0
        self.cached_tokens = 0
        self.output_tokens = 0
        self.usd = Decimal(0)
        self.calls = 0

    def add(self, c: Charge, sign: int = 1) -> None:
        self.input_tokens += sign * c.input_tokens
        self.cached_tokens += sign * c.cached_tokens
        self.output_tokens += sign * c.output_tokens
        self.usd += sign * c.usd
        self.calls += sign * c.calls

    def get(self, dim: str) -> Decimal | int:
        if dim == "total_tokens":
            return self.input_tokens + self.output_tokens
        value: Decimal | int = getattr(self, dim)
        return value

    def totals(self) -> Totals:
        return Totals(
            calls=self.calls,
            input_tokens=self.input_tokens,
            cached_tokens=self.cached_tokens,
            output_tokens=self.output_tokens,
            cost_usd=float(self.usd),
        )


_DIMS = ("usd", "input_tokens", "output_tokens", "total_tokens", "calls")


def _charge_dim(c: Charge, dim: str) -> Decimal | int:
    if dim == "total_tokens":
        return c.total_tokens
    value: Decimal | int = getattr(c, dim)
    return value


class Reservation:
    """A reservation made by `BudgetLedger.reserve`; settle or release it exactly once."""

    __slots__ = ("charge", "depth", "done", "ledger", "model")

    def __init__(self, ledger: BudgetLedger, charge: Charge, model: str, depth: int) -> None:
        self.ledger = ledger
        self.charge = charge
        self.model = model
        self.depth = depth
        self.done = False


class BudgetLedger:
    """Spent and reserved amounts against `BudgetLimits`, optionally under a parent ledger.

    Not thread-safe; safe across tasks of one event loop (every method is synchronous)."""

    def __init__(
        self,
        limits: BudgetLimits | None = None,
        *,
        parent: BudgetLedger | None = None,
        name: str = "",
        clock: Clock = time.monotonic,
    ) -> None:
        self.limits = limits or BudgetLimits()
        self.parent = parent
        self.name = name
        """Prefixes limit names in errors ("process.usd"); empty for a query's ledger."""
        self._clock = clock
        self.started_at = clock()
        self._caps: dict[str, Decimal | int] = {}
        for dim in _DIMS:
            cap = getattr(self.limits, f"max_{dim}")
            if cap is not None:
                self._caps[dim] = Decimal(str(cap)) if dim == "usd" else int(cap)
        self._spent = _Meter()
        self._reserved = _Meter()
        self._by_model: dict[str, _Meter] = {}
        self._by_depth: dict[int, _Meter] = {}
        self.refusals = 0
        """Reservations refused (calls not sent)."""
        self.last_refusal: BudgetExceeded | None = None
        self.overruns = 0
        """Settlements where the server reported more than was reserved."""
        self.peak_committed_usd = Decimal(0)
        """The most dollars this ledger had committed (spent + reserved) at once. A fan-out
        reserves every call's upper bound together, so this is what a batch must set aside
        for a query like this one, well above what it ends up spending."""
        self.peak_committed_tokens = 0
        """The same for total tokens."""

    # ------------------------------------------------------------------ chain
    def chain(self) -> Iterator[BudgetLedger]:
        ledger: BudgetLedger | None = self
        while ledger is not None:
            yield ledger
            ledger = ledger.parent

    @property
    def caps_usd(self) -> bool:
        """Whether this ledger or an ancestor has a dollar cap."""
        return any("usd" in ledger._caps for ledger in self.chain())

    def _label(self, dim: str) -> str:
        return f"{self.name}.{dim}" if self.name else dim

    # ------------------------------------------------------------------ reserve / settle
    def reserve(self, charge: Charge, *, model: str = "", depth: int = 0) -> Reservation:
        """Reserve `charge` in this ledger and every ancestor, or raise `BudgetExceeded`
        (naming the first cap it would cross) and reserve nothing."""
        for ledger in self.chain():
            for dim, cap in ledger._caps.items():
                committed = ledger._spent.get(dim) + ledger._reserved.get(dim)
                requested = _charge_dim(charge, dim)
                if committed + requested > cap:
                    exc = BudgetExceeded(ledger._label(dim), float(cap), float(committed), float(requested))
                    for refused in {id(self): self, id(ledger): ledger}.values():
                        refused.refusals += 1
                        refused.last_refusal = exc
                    emit(
                        "budget.refuse",
                        limit=exc.limit,
                        cap=exc.cap,
                        committed=exc.committed,
                        requested=exc.requested,
                        model=model,
                    )
                    raise exc
        for ledger in self.chain():
            ledger._reserved.add(charge)
            ledger._note_peak()
        emit(
            "budget.reserve",
            model=model,
            input_tokens=charge.input_tokens,
            output_tokens=charge.output_tokens,
            usd=float(charge.usd),
            calls=charge.calls,
        )
        return Reservation(self, charge, model, depth)

    def settle(self, reservation: Reservation, actual: Charge) -> None:
        """Replace the reservation by what was spent; the difference is refunded."""
        if reservation.ledger is not self:
            raise ValueError("settle a reservation with the ledger that made it")
        if reservation.done:
            raise ValueError("this reservation was already settled or released")
        reservation.done = True
        overrun: list[str] = []
        for ledger in self.chain():
            ledger._reserved.add(reservation.charge, -1)
            ledger._spent.add(actual)
            ledger._by_model.setdefault(reservation.model, _Meter()).add(actual)
            ledger._by_depth.setdefault(reservation.depth, _Meter()).add(actual)
            for dim, cap in ledger._caps.items():
                if ledger._spent.get(dim) > cap:
                    overrun.append(
                        f"{ledger._label(dim)} {float(ledger._spent.get(dim)):g} > cap {float(cap):g}"
                    )
        over_reserved = []
        for dim in _DIMS:
            used, held = _charge_dim(actual, dim), _charge_dim(reservation.charge, dim)
            if used > held:
                over_reserved.append(f"{dim} {float(used):g} > reserved {float(held):g}")
        if over_reserved:
            for ledger in self.chain():
                ledger.overruns += 1
            _log.warning(
                "a call used more than was reserved; the token estimator's bound does not hold "
                "for this server",
                model=reservation.model,
                excess=over_reserved,
                caps_crossed=overrun,
            )
        emit(
            "budget.settle",
            model=reservation.model,
            input_tokens=actual.input_tokens,
            cached_tokens=actual.cached_tokens,
            output_tokens=actual.output_tokens,
            usd=float(actual.usd),
            calls=actual.calls,
            refunded_tokens=reservation.charge.total_tokens - actual.total_tokens,
            refunded_usd=float(reservation.charge.usd - actual.usd),
            overrun=bool(over_reserved),
        )

    def _note_peak(self) -> None:
        usd = self._spent.usd + self._reserved.usd
        if usd > self.peak_committed_usd:
            self.peak_committed_usd = usd
        tokens = self._spent.get("total_tokens") + self._reserved.get("total_tokens")
        if tokens > self.peak_committed_tokens:
            self.peak_committed_tokens = int(tokens)

    def release(self, reservation: Reservation) -> None:
        """Refund a reservation whose call was never sent."""
        self.settle(reservation, Charge())

    # ------------------------------------------------------------------ reading
    @property
    def spent(self) -> Totals:
        return self._spent.totals()

    @property
    def reserved(self) -> Totals:
        return self._reserved.totals()

    @property
    def spent_usd(self) -> Decimal:
        """Exact dollars spent."""
        return self._spent.usd

    @property
    def reserved_usd(self) -> Decimal:
        """Exact dollars held by reservations not yet settled."""
        return self._reserved.usd

    def by_model(self) -> dict[str, Totals]:
        return {m: meter.totals() for m, meter in self._by_model.items()}

    def by_depth(self) -> dict[int, Totals]:
        return {d: meter.totals() for d, meter in sorted(self._by_depth.items())}

    def seconds_elapsed(self) -> float:
        return self._clock() - self.started_at

    def seconds_left(self) -> float | None:
        if self.limits.max_seconds is None:
            return None
        return max(0.0, self.limits.max_seconds - self.seconds_elapsed())

    @property
    def exhausted_by(self) -> str | None:
        """The first limit, up the chain, whose cap spending has reached (or the deadline
        passed); `None` while every cap has room."""
        for ledger in self.chain():
            for dim, cap in ledger._caps.items():
                if ledger._spent.get(dim) >= cap:
                    return ledger._label(dim)
            left = ledger.seconds_left()
            if left is not None and left <= 0:
                return ledger._label("seconds")
        return None

    @property
    def exhausted(self) -> bool:
        return self.exhausted_by is not None

    def remaining(self) -> BudgetRemaining:
        """What can still be reserved (cap - spent - reserved, at least 0), the tightest
        over the chain."""
        left: dict[str, Any] = {}
        for ledger in self.chain():
            for dim, cap in ledger._caps.items():
                room = max(cap - ledger._spent.get(dim) - ledger._reserved.get(dim), 0)
                left[dim] = room if dim not in left else min(left[dim], room)
            seconds = ledger.seconds_left()
            if seconds is not None:
                left["seconds"] = seconds if "seconds" not in left else min(left["seconds"], seconds)
        if "usd" in left:
            left["usd"] = float(left["usd"])
        return BudgetRemaining(**left)

    def describe_remaining(self) -> str:
        """One line for the root model: "$0.42 of $1.00, 12,000 of 50,000 tokens, ...";
        an ancestor's caps follow after "process: ". Empty when nothing is capped."""
        parts: list[str] = []
        for ledger in self.chain():
            text = ledger._describe_own()
            if text:
                parts.append(text if ledger is self or not ledger.name else f"{ledger.name}: {text}")
        return "; ".join(parts)

    def summary(self) -> str:
        """`describe_remaining()` plus what was spent, for logs and results."""
        s = self._spent
        spent = (
            f"spent {_usd(s.usd)}, {s.input_tokens + s.output_tokens:,} tokens "
            f"({s.input_tokens:,} in of which {s.cached_tokens:,} cached, {s.output_tokens:,} out) "
            f"in {s.calls:,} calls"
        )
        left = self.describe_remaining()
        return f"budget left: {left}; {spent}" if left else f"no budget caps; {spent}"

    def _describe_own(self) -> str:
        parts: list[str] = []
        names = {
            "usd": None,
            "total_tokens": "tokens",
            "input_tokens": "input tokens",
            "output_tokens": "output tokens",
            "calls": "calls",
        }
        for dim, noun in names.items():
            cap = self._caps.get(dim)
            if cap is None:
                continue
            room = max(cap - self._spent.get(dim) - self._reserved.get(dim), 0)
            if dim == "usd":
                parts.append(f"{_usd(Decimal(room))} of {_usd(Decimal(cap))}")
            else:
                parts.append(f"{int(room):,} of {int(cap):,} {noun}")
        left = self.seconds_left()
        if left is not None:
            parts.append(f"{left:,.0f} s of {self.limits.max_seconds:,.0f} s")
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"<BudgetLedger {self.name or 'query'}: {self.summary()}>"


def _usd(value: Decimal) -> str:
    if value == 0 or abs(value) >= Decimal("0.1"):
        return f"${value:,.2f}"
    return f"${value:.4f}"
