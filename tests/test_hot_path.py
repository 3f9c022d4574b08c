"""Shortcuts on the per-call path (run thousands of times per fan-out) give exactly what the
general code gives: usage arithmetic, the reservation's price, a settled charge, and the
concurrency limiter's free-slot path, which must not jump its queue."""

from __future__ import annotations

import dataclasses
import random
from decimal import Decimal

import anyio
import anyio.lowlevel
import pytest

from rlm_async._governor import Charge, EndpointLimits, ManualClock, ModelPrice, PriceTable
from rlm_async._governor._limits import LimitState, Permit
from rlm_async._types import Usage


def _random_usage(rng: random.Random) -> Usage:
    return Usage(
        rng.randrange(10**6),
        rng.randrange(10**5),
        rng.randrange(10**6),
        cost_usd=rng.random(),
        calls=rng.randrange(9),
        failed_calls=rng.randrange(9),
        refused_calls=rng.randrange(9),
        journal_hits=rng.randrange(9),
    )


class TestUsageArithmetic:
    def test_sums_and_differences_equal_the_constructors(self) -> None:
        """`+`, `-` and unary `-` give the Usage the dataclass constructor gives, field by
        field, equal and with the same hash."""
        rng = random.Random(7)
        for _ in range(200):
            a, b = _random_usage(rng), _random_usage(rng)
            fa, fb = dataclasses.astuple(a), dataclasses.astuple(b)
            names = [f.name for f in dataclasses.fields(Usage)]
            made = {
                "+": Usage(**dict(zip(names, (x + y for x, y in zip(fa, fb, strict=True)), strict=True))),
                "-": Usage(**dict(zip(names, (x - y for x, y in zip(fa, fb, strict=True)), strict=True))),
                "neg": Usage(**dict(zip(names, (-x for x in fa), strict=True))),
            }
            for got, want in ((a + b, made["+"]), (a - b, made["-"]), (-a, made["neg"])):
                assert type(got) is Usage and got == want and hash(got) == hash(want)
                assert dataclasses.astuple(got) == dataclasses.astuple(want)

    def test_a_settled_charge_keeps_every_field_but_calls(self) -> None:
        """`Charge.of_usage` is the usage with `calls` replaced, nothing else changed."""
        usage = _random_usage(random.Random(3))
        charge = Charge.of_usage(usage, usd=Decimal("0.25"), calls=2)
        assert charge.usage == dataclasses.replace(usage, calls=2) and charge.usd == Decimal("0.25")


class TestReservationPrice:
    @pytest.mark.parametrize(
        "price",
        [
            ModelPrice(input_per_mtok=0.15, output_per_mtok=0.6),
            ModelPrice(input_per_mtok=2.5, output_per_mtok=10.0, cached_input_per_mtok=1.25),
            ModelPrice(input_per_mtok=3, output_per_mtok=15, cached_input_per_mtok=0.3),
            ModelPrice.free(),
        ],
    )
    def test_a_configured_price_reserves_what_the_table_reserves(self, price: ModelPrice) -> None:
        """The reservation's dollars for a model's own price equal the table's rule (the
        dearer of all uncached and all cached input, plus the whole output cap)."""
        table = PriceTable({"m": price})  # resolved through the table: cost(cold) vs cost(warm)
        for prompt, output in ((0, 0), (1, 1), (12_345, 256), (10**7, 8192)):
            via_table = table.reserve_cost("m", prompt, output)
            direct = PriceTable().reserve_cost("m", prompt, output, override=price)
            assert direct == via_table


@pytest.mark.anyio
class TestLimiterFreeSlot:
    async def test_a_newcomer_does_not_take_a_slot_a_waiter_queued_for(self) -> None:
        """With one slot: A holds it, B queues; A gives it back and C asks at once. The slot
        is B's: the free-slot path refuses while anyone is queued."""
        clock = ManualClock()
        state = LimitState("e", "m", EndpointLimits(max_concurrency=1), clock=clock, sleep=clock.sleep)
        order: list[str] = []
        a = await state.acquire(1)
        permits: dict[str, Permit] = {}

        async def take(name: str) -> None:
            permits[name] = await state.acquire(1)
            order.append(name)

        async with anyio.create_task_group() as tg:
            tg.start_soon(take, "B")
            for _ in range(3):
                await anyio.lowlevel.checkpoint()  # B is queued
            state.release(a)
            tg.start_soon(take, "C")
            while len(order) < 1:
                await anyio.lowlevel.checkpoint()
            assert order == ["B"]
            state.release(permits["B"])
        assert order == ["B", "C"]
        state.release(permits["C"])
        assert state.in_flight == 0
