"""Budgets: reserve before a call, settle after it, so committed spend never crosses a cap.

A `BudgetLedger` counts one query's whole call tree (the engine hands the same ledger to
child RLMs); its optional `parent` (the process ledger) sees every charge too, and a
reservation must fit in every ledger up the chain.

    ledger = BudgetLedger(BudgetLimits(max_usd=1.00, max_total_tokens=50_000), parent=process)
    r = ledger.reserve(Charge(Usage(900, 512, calls=1), Decimal("0.002")),
                       model="gpt-5-mini")              # raises BudgetExceeded: nothing is sent
    ...                                                   # the call
    ledger.settle(r, Charge.of_usage(usage, usd=cost))    # the truth; the rest is refunded

The guarantee: for every capped quantity, spent + reserved <= cap after every `reserve`
(checked and applied with no await in between, so concurrent tasks cannot both take the last
dollar). `settle` replaces a reservation by what the server reported; when that is no more
than what was reserved (the estimator is an upper bound, see `_estimate.py`), spent stays
<= cap. When a server reports more, the ledger records the truth, counts an overrun and
logs it: the bill is what it is. Everything here is synchronous and safe under cancellation.

The ledger enforces caps; it is not a second set of books. Per-model and per-depth figures
come from the call records (`RLMResult.by_model`, `by_depth`), not from here. A ledger may
persist its own books through a `LedgerLog` (the batch's spend log): told of every
reservation before the call can be sent, and of every settlement, so a process killed
mid-call leaves a record of what it had committed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Protocol

import structlog

from .._checks import is_number, is_whole_number
from .._events import BudgetRefuse, BudgetReserve, BudgetSettle, emit
from .._types import Usage
from ..exceptions import BudgetExceeded, ConfigError
from ._clock import Clock

__all__ = ["BudgetLedger", "BudgetLimits", "Charge", "LedgerLog", "Reservation", "Room"]

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
            if value is None:
                continue
            if not is_number(value) or not value >= 0:
                raise ConfigError(f"BudgetLimits.{name} is {value!r}; use a number >= 0, or None for no cap")
            if name not in ("max_usd", "max_seconds") and not is_whole_number(value):
                raise ConfigError(
                    f"BudgetLimits.{name} is {value!r}; use a whole number (1_000_000 in TOML), or None for no cap"
                )

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


@dataclass(frozen=True, slots=True)
class Charge:
    """An amount to reserve or to record: a `Usage` (tokens, calls) and its exact dollars.

    Why not the usage's float `cost_usd`: caps are enforced on sums of charges, and float
    sums drift (ten $0.10 charges do not add up to $1.00 in binary), which would let a
    reservation cross a cap by a hair or refuse one that fits exactly. So the ledger adds
    Decimal dollars and shows them as the float `cost_usd` only when read (`spent`)."""

    usage: Usage = field(default_factory=Usage)
    """Tokens and calls; its `cost_usd` is ignored (the dollars are `usd`)."""
    usd: Decimal = Decimal(0)

    def __add__(self, other: Charge) -> Charge:
        return Charge(self.usage + other.usage, self.usd + other.usd)

    def __sub__(self, other: Charge) -> Charge:
        return Charge(self.usage - other.usage, self.usd - other.usd)

    def dim(self, dim: str) -> Decimal | int:
        """The amount a cap named `dim` ("usd", "input_tokens", ...) counts."""
        if dim == "usd":
            return self.usd
        return int(getattr(self.usage, _USAGE_FIELD[dim]))

    def as_usage(self) -> Usage:
        """The usage with the exact dollars shown as its float `cost_usd`."""
        return replace(self.usage, cost_usd=float(self.usd))

    @classmethod
    def of_usage(cls, usage: Usage, *, usd: Decimal, calls: int = 1) -> Charge:
        """A settled call: the tokens a server reported, counted as `calls` calls."""
        # Field by field: `dataclasses.replace` costs several times this, once per call.
        return cls(
            Usage(
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.cached_tokens,
                cost_usd=usage.cost_usd,
                calls=calls,
                failed_calls=usage.failed_calls,
                refused_calls=usage.refused_calls,
                journal_hits=usage.journal_hits,
            ),
            usd,
        )


_USAGE_FIELD = {
    "input_tokens": "prompt_tokens",
    "output_tokens": "completion_tokens",
    "total_tokens": "total_tokens",
    "calls": "calls",
}
"""Cap names (`BudgetLimits.max_<name>`, `BudgetExceeded.limit`) -> the `Usage` field counted."""
_DIMS = ("usd", *_USAGE_FIELD)


@dataclass(frozen=True, slots=True)
class Room:
    """What is left under the tightest cap of one quantity, over a ledger and its ancestors."""

    limit: str
    """The cap's name, as in `BudgetExceeded.limit` ("calls", "process.calls")."""
    cap: float
    committed: float
    """Spent plus reserved under that cap."""
    room: int
    """cap - committed, never below 0."""


class LedgerLog(Protocol):
    """Persists one ledger's books as they change. Called synchronously, so a record is
    written before the reserved call can be sent."""

    def reserved(self, charge: Charge) -> None:
        """`charge` is about to be reserved; raising refuses the reservation (nothing sent)."""

    def settled(self, held: Charge, spent: Charge) -> None:
        """A reservation of `held` was replaced by `spent` (zero: released unsent)."""


class Reservation:
    """A reservation made by `BudgetLedger.reserve`; settle or release it exactly once."""

    __slots__ = ("charge", "done", "ledger", "model")

    def __init__(self, ledger: BudgetLedger, charge: Charge, model: str) -> None:
        self.ledger = ledger
        self.charge = charge
        self.model = model
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
        log: LedgerLog | None = None,
    ) -> None:
        self.limits = limits or BudgetLimits()
        self.parent = parent
        self.name = name
        self.log = log
        """Told of every reservation and settlement in this ledger (see `LedgerLog`)."""
        """Prefixes limit names in errors ("process.usd"); empty for a query's ledger."""
        self._clock = clock
        self.started_at = clock()
        self._caps: dict[str, Decimal | int] = {}
        for dim in _DIMS:
            cap = getattr(self.limits, f"max_{dim}")
            if cap is not None:
                self._caps[dim] = Decimal(str(cap)) if dim == "usd" else int(cap)
        self._spent = Charge()
        self._reserved = Charge()
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

    def set_limits(self, limits: BudgetLimits) -> None:
        """Replace this ledger's caps while it runs (a distributed runner's lease grows or
        shrinks). What is already committed stays; a cap below it refuses new reservations."""
        self.limits = limits
        self._caps = {}
        for dim in _DIMS:
            cap = getattr(limits, f"max_{dim}")
            if cap is not None:
                self._caps[dim] = Decimal(str(cap)) if dim == "usd" else int(cap)

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
    def reserve(self, charge: Charge, *, model: str = "") -> Reservation:
        """Reserve `charge` in this ledger and every ancestor, or raise `BudgetExceeded`
        (naming the first cap it would cross) and reserve nothing."""
        for ledger in self.chain():
            for dim, cap in ledger._caps.items():
                committed = ledger._spent.dim(dim) + ledger._reserved.dim(dim)
                requested = charge.dim(dim)
                if committed + requested > cap:
                    exc = BudgetExceeded(ledger._label(dim), float(cap), float(committed), float(requested))
                    for refused in {id(self): self, id(ledger): ledger}.values():
                        refused.refusals += 1
                        refused.last_refusal = exc
                    emit(
                        BudgetRefuse,
                        limit=exc.limit,
                        cap=exc.cap,
                        committed=exc.committed,
                        requested=exc.requested,
                        model=model,
                    )
                    raise exc
        for ledger in self.chain():
            if ledger.log is not None:
                ledger.log.reserved(charge)  # may raise: then nothing is reserved or sent
        for ledger in self.chain():
            ledger._reserved += charge
            ledger._note_peak()
        emit(
            BudgetReserve,
            model=model,
            input_tokens=charge.usage.prompt_tokens,
            output_tokens=charge.usage.completion_tokens,
            usd=float(charge.usd),
            calls=charge.usage.calls,
        )
        return Reservation(self, charge, model)

    def settle(self, reservation: Reservation, actual: Charge) -> None:
        """Replace the reservation by what was spent; the difference is refunded."""
        if reservation.ledger is not self:
            raise ValueError("settle a reservation with the ledger that made it")
        if reservation.done:
            raise ValueError("this reservation was already settled or released")
        reservation.done = True
        overrun: list[str] = []
        for ledger in self.chain():
            ledger._reserved -= reservation.charge
            ledger._spent += actual
            if ledger.log is not None:
                ledger.log.settled(reservation.charge, actual)
            for dim, cap in ledger._caps.items():
                if ledger._spent.dim(dim) > cap:
                    overrun.append(
                        f"{ledger._label(dim)} {float(ledger._spent.dim(dim)):g} > cap {float(cap):g}"
                    )
        over_reserved = []
        held, used_usage, held_usage = reservation.charge, actual.usage, reservation.charge.usage
        # The common case (within the reservation) in a few comparisons; dims named only
        # when one was crossed. Runs once per call, 5,000 times in a wide fan-out.
        if (
            actual.usd > held.usd
            or used_usage.prompt_tokens > held_usage.prompt_tokens
            or used_usage.completion_tokens > held_usage.completion_tokens
            or used_usage.calls > held_usage.calls
        ):
            for dim in _DIMS:
                used, reserved = actual.dim(dim), held.dim(dim)
                if used > reserved:
                    over_reserved.append(f"{dim} {float(used):g} > reserved {float(reserved):g}")
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
            BudgetSettle,
            model=reservation.model,
            input_tokens=actual.usage.prompt_tokens,
            cached_tokens=actual.usage.cached_tokens,
            output_tokens=actual.usage.completion_tokens,
            usd=float(actual.usd),
            calls=actual.usage.calls,
            refunded_tokens=reservation.charge.usage.total_tokens - actual.usage.total_tokens,
            refunded_usd=float(reservation.charge.usd - actual.usd),
            overrun=bool(over_reserved),
        )

    def _note_peak(self) -> None:
        usd = self._spent.usd + self._reserved.usd
        if usd > self.peak_committed_usd:
            self.peak_committed_usd = usd
        tokens = self._spent.dim("total_tokens") + self._reserved.dim("total_tokens")
        if tokens > self.peak_committed_tokens:
            self.peak_committed_tokens = int(tokens)

    def release(self, reservation: Reservation) -> None:
        """Refund a reservation whose call was never sent."""
        self.settle(reservation, Charge())

    # ------------------------------------------------------------------ reading
    def room(self, dim: str) -> Room | None:
        """The tightest room for a counted quantity ("calls", "total_tokens", ...) over this
        ledger and its ancestors; `None` when none of them caps it. O(depth of the chain)."""
        tightest: Room | None = None
        for ledger in self.chain():
            cap = ledger._caps.get(dim)
            if cap is None:
                continue
            committed = ledger._spent.dim(dim) + ledger._reserved.dim(dim)
            left = max(int(cap - committed), 0)
            if tightest is None or left < tightest.room:
                tightest = Room(ledger._label(dim), float(cap), float(committed), left)
        return tightest

    @property
    def spent(self) -> Usage:
        """What was spent, dollars as a float view (`spent_usd` is exact)."""
        return self._spent.as_usage()

    @property
    def reserved(self) -> Usage:
        """What reservations not yet settled hold, dollars as a float view."""
        return self._reserved.as_usage()

    @property
    def spent_usd(self) -> Decimal:
        """Exact dollars spent."""
        return self._spent.usd

    @property
    def reserved_usd(self) -> Decimal:
        """Exact dollars held by reservations not yet settled."""
        return self._reserved.usd

    def seconds_left(self) -> float | None:
        if self.limits.max_seconds is None:
            return None
        return max(0.0, self.limits.max_seconds - (self._clock() - self.started_at))

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
        s = self._spent.usage
        spent = (
            f"spent {_usd(self._spent.usd)}, {s.total_tokens:,} tokens "
            f"({s.prompt_tokens:,} in of which {s.cached_tokens:,} cached, {s.completion_tokens:,} out) "
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
            room = max(cap - self._spent.dim(dim) - self._reserved.dim(dim), 0)
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
