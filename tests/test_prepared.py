"""What a call can work out before it may be sent (`Governor.plan`, `Transport.encode`), and
that admission still happens at send time, against the budget's state then."""

from __future__ import annotations

import orjson
import pytest

from rlm_async._governor import BudgetLimits, Governor, GovernorConfig
from rlm_async._types import Completion, Message, ModelRequest, Usage
from rlm_async.exceptions import BudgetExceeded
from rlm_async.sim import SimConfig, SimServer
from rlm_async.testing import ScriptedTransport
from rlm_async.transport import Encoded, OpenAITransport, encode_body

pytestmark = pytest.mark.anyio


def req(text: str = "hello", *, max_tokens: int | None = 10) -> ModelRequest:
    return ModelRequest(model="sim-mini", messages=(Message("user", text),), max_tokens=max_tokens)


class TestPlan:
    async def test_a_planned_call_reserves_what_an_unplanned_one_does(self) -> None:
        """`call(plan=governor.plan(r))` reserves, meters and charges as `call(r)` does."""
        governor = Governor(GovernorConfig(chars_per_token=4.0))
        transport = ScriptedTransport(lambda r: "ok")
        request = req("x" * 400, max_tokens=None)
        plain = await governor.call(request, transport)
        planned = await governor.call(request, transport, plan=governor.plan(request))
        assert (planned.reserved_input_tokens, planned.reserved_output_tokens, planned.reserved_usd) == (
            plain.reserved_input_tokens,
            plain.reserved_output_tokens,
            plain.reserved_usd,
        )
        assert planned.usage == plain.usage and planned.attempts == plain.attempts == 1
        assert transport.requests[1].max_tokens == GovernorConfig().default_max_tokens

    async def test_plans_made_together_are_admitted_one_by_one_at_send_time(self) -> None:
        """Two calls planned while the budget had room for one reservation: planning holds
        nothing, so the second is admitted once the first's refund has made room (an early
        reservation would have refused it)."""
        governor = Governor(GovernorConfig(chars_per_token=4.0))
        a, b = req("a" * 400), req("b" * 400)
        plans = [governor.plan(a), governor.plan(b)]
        one = plans[0].reserve.usage.total_tokens
        ledger = governor.ledger(BudgetLimits(max_total_tokens=one + one // 2))
        # Each call uses far fewer tokens than it reserves (a cached prompt, a short answer).
        transport = ScriptedTransport(lambda r: Completion(text="ok", usage=Usage(5, 1), model=r.model))
        for request, plan in zip((a, b), plans, strict=True):
            await governor.call(request, transport, ledger=ledger, plan=plan)
        assert len(transport.requests) == 2
        assert ledger.reserved == Usage()

    async def test_a_plan_is_refused_when_the_budget_is_spent_by_send_time(self) -> None:
        """A plan is no promise: the budget spent after it was made refuses it, nothing sent."""
        governor = Governor()
        ledger = governor.ledger(BudgetLimits(max_calls=1))
        transport = ScriptedTransport(lambda r: "ok")
        plans = [governor.plan(req("a")), governor.plan(req("b"))]
        await governor.call(req("a"), transport, ledger=ledger, plan=plans[0])
        with pytest.raises(BudgetExceeded):
            await governor.call(req("b"), transport, ledger=ledger, plan=plans[1])
        assert len(transport.requests) == 1 and ledger.reserved == Usage()


class TestEncoded:
    def test_a_body_is_taken_once(self) -> None:
        """The body made ahead goes with one attempt; the next gets nothing and encodes anew."""
        encoded = Encoded(b"{}")
        assert encoded.size == 2 and encoded.take() == b"{}"
        assert encoded.take() is None and encoded.size == 0

    async def test_a_transport_without_bodies_ahead_sends_the_request(self) -> None:
        """The default hooks: nothing made ahead, `complete_encoded` is `complete`."""
        transport = ScriptedTransport(lambda r: "ok")
        assert transport.encode(req()) is None
        completion = await transport.complete_encoded(req(), Encoded(b"ignored"))
        assert completion.text == "ok" and transport.requests == [req()]

    async def test_the_server_gets_the_body_made_ahead_and_a_fresh_one_after(self) -> None:
        """Over HTTP: the body made ahead is what `complete` would send; sent once, the same
        `Encoded` (a retry) sends the request encoded anew, byte for byte the same."""
        request = req("Count the invoices.\n" * 300)
        async with SimServer(SimConfig(record_bodies=True)) as sim:
            assert sim.base_url is not None
            transport = OpenAITransport(sim.base_url, api_key_env=None)
            try:
                encoded = transport.encode(request)
                assert encoded.size == len(encode_body(request))
                await transport.complete_encoded(request, encoded)
                assert encoded.size == 0
                await transport.complete_encoded(request, encoded)
                await transport.complete(request)
            finally:
                await transport.aclose()
            entries = sim.log.entries
        assert len(entries) == 3
        assert len({e.body_sha256 for e in entries}) == 1
        assert entries[0].body == orjson.loads(encode_body(request))
