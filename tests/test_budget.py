"""Budget ledgers: reserve before, settle after; caps exactly at the edge; concurrent
reservations racing for the last dollar; the process (parent) ledger; what the engine shows
the root model."""

from __future__ import annotations

import random
from decimal import Decimal

import anyio
import anyio.lowlevel
import pytest
import structlog

from rlm_async._events import BudgetRefuse, BudgetSettle
from rlm_async._governor import (
    BudgetLedger,
    BudgetLimits,
    Charge,
    EndpointLimits,
    Governor,
    GovernorConfig,
    ManualClock,
    ModelPrice,
)
from rlm_async._types import Completion, Message, ModelRequest, Usage
from rlm_async.exceptions import BudgetExceeded, ConfigError
from rlm_async.testing import ScriptedTransport, capture_events

pytestmark = pytest.mark.anyio


def tokens(n_in: int, n_out: int = 0, calls: int = 1) -> Charge:
    return Charge(Usage(n_in, n_out, calls=calls))


class TestLimits:
    def test_none_disables_and_negative_is_refused(self) -> None:
        """Every cap defaults to None (off); a negative cap is a ConfigError naming it."""
        assert BudgetLimits().unlimited
        with pytest.raises(ConfigError, match=r"BudgetLimits.max_usd is -1"):
            BudgetLimits(max_usd=-1)

    @pytest.mark.parametrize(
        ("fields", "match"),
        [
            ({"max_usd": "5"}, r"BudgetLimits.max_usd is '5'; use a number >= 0"),
            ({"max_calls": True}, r"BudgetLimits.max_calls is True; use a number >= 0"),
            ({"max_calls": 2.5}, r"BudgetLimits.max_calls is 2.5; use a whole number \(1_000_000 in TOML\)"),
            ({"max_total_tokens": 1e6}, r"BudgetLimits.max_total_tokens is 1000000.0; use a whole number"),
        ],
    )
    def test_a_cap_that_is_not_a_number_is_named(self, fields: dict[str, object], match: str) -> None:
        """A str from a config or an environment variable was a TypeError from a comparison;
        a bool was taken as 0 or 1; a fraction of a call or a token was accepted."""
        with pytest.raises(ConfigError, match=match):
            BudgetLimits(**fields)  # type: ignore[arg-type]
        assert BudgetLimits(max_usd=2, max_seconds=0.5, max_total_tokens=10).max_usd == 2

    @pytest.mark.parametrize(
        ("fields", "match"),
        [
            ({"requests_per_minute": "60"}, r"EndpointLimits.requests_per_minute is '60'; use a number"),
            ({"max_concurrency": 2.5}, r"EndpointLimits.max_concurrency is 2.5; use a whole number >= 1"),
            ({"min_concurrency": True}, r"EndpointLimits.min_concurrency is True; use a whole number >= 1"),
        ],
    )
    def test_a_limit_that_is_not_a_number_is_named(self, fields: dict[str, object], match: str) -> None:
        with pytest.raises(ConfigError, match=match):
            EndpointLimits(**fields)  # type: ignore[arg-type]

    def test_official_mapping(self) -> None:
        """max_budget -> max_usd, max_tokens -> max_total_tokens, max_timeout -> max_seconds."""
        limits = BudgetLimits.from_official(max_budget=1.5, max_tokens=1000, max_timeout=30)
        assert (limits.max_usd, limits.max_total_tokens, limits.max_seconds) == (1.5, 1000, 30)


class TestReserve:
    def test_exactly_at_the_cap_fits(self) -> None:
        """A reservation that brings the total exactly to the cap is accepted."""
        ledger = BudgetLedger(BudgetLimits(max_total_tokens=100))
        ledger.reserve(tokens(60, 40))
        assert ledger.reserved.total_tokens == 100

    def test_one_token_over_is_refused_with_the_numbers(self) -> None:
        """One token over the cap raises BudgetExceeded naming the limit, the cap, what is
        committed and what was asked; nothing is reserved."""
        ledger = BudgetLedger(BudgetLimits(max_total_tokens=100))
        ledger.reserve(tokens(50))
        with pytest.raises(BudgetExceeded) as caught:
            ledger.reserve(tokens(30, 21))
        exc = caught.value
        assert (exc.limit, exc.cap, exc.committed, exc.requested) == ("total_tokens", 100, 50, 51)
        assert "total_tokens cap is 100, 50 already spent or reserved, this call needs up to 51" in str(exc)
        assert ledger.reserved.total_tokens == 50
        assert ledger.refusals == 1 and ledger.last_refusal is exc

    @pytest.mark.parametrize(
        ("limits", "charge", "limit"),
        [
            (BudgetLimits(max_input_tokens=10), Charge(Usage(11)), "input_tokens"),
            (BudgetLimits(max_output_tokens=10), Charge(Usage(0, 11)), "output_tokens"),
            (BudgetLimits(max_calls=0), Charge(Usage(calls=1)), "calls"),
            (BudgetLimits(max_usd=0.01), Charge(usd=Decimal("0.010001")), "usd"),
        ],
    )
    def test_each_cap_is_checked(self, limits: BudgetLimits, charge: Charge, limit: str) -> None:
        """Each kind of cap refuses a reservation that crosses it."""
        with pytest.raises(BudgetExceeded) as caught:
            BudgetLedger(limits).reserve(charge)
        assert caught.value.limit == limit

    def test_dollars_are_exact(self) -> None:
        """Ten reservations of $0.10 fill a $1.00 cap exactly (no float drift)."""
        ledger = BudgetLedger(BudgetLimits(max_usd=1.0))
        for _ in range(10):
            ledger.reserve(Charge(Usage(calls=1), Decimal("0.1")))
        with pytest.raises(BudgetExceeded):
            ledger.reserve(Charge(Usage(calls=1), Decimal("0.000001")))


class TestSettle:
    def test_settle_records_usage_and_refunds_the_rest(self) -> None:
        """Settling replaces the reservation by the reported usage; the rest is free again."""
        ledger = BudgetLedger(BudgetLimits(max_total_tokens=1000, max_usd=1.0))
        r = ledger.reserve(Charge(Usage(600, 300, calls=1), Decimal("0.9")), model="m")
        assert ledger.describe_remaining() == "$0.10 of $1.00, 100 of 1,000 tokens"
        ledger.settle(r, Charge(Usage(200, 20, 50, calls=1), Decimal("0.2")))
        assert ledger.spent.total_tokens == 220 and ledger.spent.cached_tokens == 50
        assert ledger.reserved.total_tokens == 0
        assert ledger.describe_remaining() == "$0.80 of $1.00, 780 of 1,000 tokens"

    def test_release_refunds_everything(self) -> None:
        """A reservation whose call was never sent is refunded in full."""
        ledger = BudgetLedger(BudgetLimits(max_calls=1))
        r = ledger.reserve(tokens(10))
        ledger.release(r)
        assert ledger.spent.calls == 0
        ledger.reserve(tokens(10))  # the slot is free again

    def test_settle_twice_is_an_error(self) -> None:
        """A reservation is settled exactly once."""
        ledger = BudgetLedger()
        r = ledger.reserve(tokens(1))
        ledger.settle(r, tokens(1))
        with pytest.raises(ValueError, match="already settled"):
            ledger.settle(r, tokens(1))

    def test_more_than_reserved_is_recorded_as_the_truth(self) -> None:
        """When a server reports more than was reserved, the ledger records what it said,
        counts an overrun and logs it (the estimator's assumption broke)."""
        ledger = BudgetLedger(BudgetLimits(max_total_tokens=100))
        r = ledger.reserve(tokens(50, 40))
        with structlog.testing.capture_logs() as logs:
            ledger.settle(r, tokens(80, 40))
        assert ledger.spent.total_tokens == 120
        assert ledger.overruns == 1
        assert logs[0]["log_level"] == "warning"
        assert "total_tokens 120 > cap 100" in logs[0]["caps_crossed"]


class TestRace:
    async def test_concurrent_reservations_for_the_last_dollar(self) -> None:
        """Twenty tasks each needing $0.30 race for a $1.00 budget through Governor.call:
        exactly three are sent, seventeen are refused with BudgetExceeded."""
        gov = Governor(GovernorConfig(chars_per_token=1000.0), rng=random.Random(0))
        # Output priced so one max_tokens=1 call reserves exactly $0.30; input free.
        price = ModelPrice(input_per_mtok=0.0, output_per_mtok=300_000.0)
        ledger = gov.ledger(BudgetLimits(max_usd=1.0))
        gate = anyio.Event()

        async def handler(r: ModelRequest) -> Completion:
            await gate.wait()
            return Completion(text="x", usage=Usage(1, 1), model=r.model)

        transport = ScriptedTransport(handler)
        refused: list[BudgetExceeded] = []
        request = ModelRequest(model="m", messages=(Message("user", "q"),), max_tokens=1)

        async def one() -> None:
            try:
                await gov.call(request, transport, ledger=ledger, price=price)
            except BudgetExceeded as exc:
                refused.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(one)
            while transport.in_flight + len(refused) < 20:
                await anyio.lowlevel.checkpoint()
            gate.set()
        assert len(transport.requests) == 3
        assert len(refused) == 17
        assert {(e.limit, e.cap, e.committed, e.requested) for e in refused} == {("usd", 1.0, 0.9, 0.3)}
        assert ledger.spent_usd == Decimal("0.9")


class TestParent:
    def test_process_cap_refuses_a_query_with_room(self) -> None:
        """A query whose own cap has room is refused when the process cap would be
        crossed; the limit is named "process.<cap>"."""
        process = BudgetLedger(BudgetLimits(max_calls=3), name="process")
        q1 = BudgetLedger(BudgetLimits(max_calls=10), parent=process)
        q2 = BudgetLedger(BudgetLimits(max_calls=10), parent=process)
        q1.reserve(tokens(1))
        q1.reserve(tokens(1))
        q2.reserve(tokens(1))
        with pytest.raises(BudgetExceeded) as caught:
            q2.reserve(tokens(1))
        assert (caught.value.limit, caught.value.cap, caught.value.committed) == ("process.calls", 3, 3)
        assert q2.reserved.calls == 1  # nothing half-applied
        assert process.refusals == 1 and q2.refusals == 1

    def test_charges_reach_the_parent(self) -> None:
        """Spending in a query ledger shows in the process ledger, per model and depth."""
        process = BudgetLedger(name="process")
        q = BudgetLedger(parent=process)
        r = q.reserve(tokens(10, 5), model="a")
        q.settle(r, Charge(Usage(4, 2, calls=1), Decimal("0.5")))
        assert process.spent == q.spent


class TestReporting:
    def test_describe_remaining_for_the_root_model(self) -> None:
        """The line shown each turn names what is left of every cap, then the process's."""
        clock = ManualClock()
        process = BudgetLedger(BudgetLimits(max_usd=10.0), name="process", clock=clock)
        ledger = BudgetLedger(
            BudgetLimits(max_usd=1.0, max_total_tokens=50_000, max_calls=100, max_seconds=600),
            parent=process,
            clock=clock,
        )
        r = ledger.reserve(Charge(Usage(30_000, 8_000, calls=12), Decimal("0.58")))
        ledger.settle(r, Charge(Usage(30_000, 8_000, calls=12), Decimal("0.58")))
        clock.advance(88)
        assert ledger.describe_remaining() == (
            "$0.42 of $1.00, 12,000 of 50,000 tokens, 88 of 100 calls, 512 s of 600 s; "
            "process: $9.42 of $10.00"
        )
        assert ledger.summary().startswith("budget left: $0.42 of $1.00")
        assert "spent $0.58, 38,000 tokens" in ledger.summary()

    def test_unlimited_ledger_describes_nothing(self) -> None:
        """With no caps anywhere the remaining line is empty and the summary says so."""
        ledger = BudgetLedger()
        assert ledger.describe_remaining() == ""
        assert ledger.summary().startswith("no budget caps; spent $0.00")

    def test_deadline_is_carried(self) -> None:
        """max_seconds is carried: seconds_left counts down and stops at zero."""
        clock = ManualClock()
        ledger = BudgetLedger(BudgetLimits(max_seconds=30), clock=clock)
        clock.advance(12)
        assert ledger.seconds_left() == 18
        clock.advance(20)
        assert ledger.seconds_left() == 0

    async def test_budget_events(self) -> None:
        """Reserve, refuse and settle each emit an event with the numbers."""
        ledger = BudgetLedger(BudgetLimits(max_total_tokens=10))
        with capture_events() as events:
            r = ledger.reserve(tokens(6), model="m")
            with pytest.raises(BudgetExceeded):
                ledger.reserve(tokens(5), model="m")
            ledger.settle(r, tokens(2))
        kinds = [e.kind for e in events]
        assert kinds == ["budget.reserve", "budget.refuse", "budget.settle"]
        (refused,), (settled,) = events.of(BudgetRefuse), events.of(BudgetSettle)
        assert refused.limit == "total_tokens" and refused.requested == 5
        assert settled.refunded_tokens == 4
