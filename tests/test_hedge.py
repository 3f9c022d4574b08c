"""Hedged sub-calls and results in completion order.

The policy is tested as a pure function (ages and shares in, decisions out). The mechanism
is tested end to end over real HTTP against the simulator, asserting what the server
observed: duplicates sent, losers cancelled (the client closed their connections, so the
server logged them "cancelled" long before their modeled finish), what a cancelled request
bills, and that no budget cap is crossed. No test asserts a duration.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import EventLog, open_sim, sim_config

from rlm_async._config import HedgeConfig, RLMConfig
from rlm_async._engine.hedge_policy import HedgePolicy, Running, quantile
from rlm_async._events import CallHedge
from rlm_async._governor import BudgetLedger, BudgetLimits, GovernorConfig, ModelPrice
from rlm_async._rlm import RLM
from rlm_async.exceptions import ConfigError
from rlm_async.sim import Faults, KindLatency, LatencyModel, Policies, PolicySpec, SimConfig, SimServer

pytestmark = pytest.mark.e2e

PRICE = ModelPrice(input_per_mtok=1.0, output_per_mtok=4.0)


def _code(body: str) -> Policies:
    return Policies(
        root=PolicySpec(name="fixed", options={"text": f"```repl\n{body}\n```"}), sub=PolicySpec(name="echo")
    )


def _sim(
    policies: Policies, *, script: tuple[str, ...] = (), sigma: float = 0.0, **latency: Any
) -> SimConfig:
    sub = KindLatency(ttft_s=latency.pop("ttft_s", 0.02), sigma=sigma, **latency)
    return SimConfig(
        latency=LatencyModel(sub=sub),
        faults=Faults(script=script, slow_extra_s=60.0),
        policies=policies,
    )


async def _settled(sim: SimServer, count: int) -> None:
    """The server logs a cancelled request when it notices the disconnect: wait for it."""
    with anyio.fail_after(20):
        await sim.log.wait_for(count)


async def _logged(sim: SimServer, seen: Callable[[list[Any]], bool]) -> list[Any]:
    """The server's log once `seen` holds for it. A copy cancelled before it reached the
    server is never logged, so waiting for a count of copies could wait forever."""
    with anyio.fail_after(20):
        while not seen(list(sim.log.entries)):
            await sim.log.wait_for(len(sim.log.entries) + 1)
    return list(sim.log.entries)


def _subs(sim: SimServer) -> list[Any]:
    return [e for e in sim.log.entries if e.kind == "sub"]


class TestHedgePolicy:
    """The decision alone: stages by finished share, a quantile of history, stragglers."""

    def policy(self, **kw: Any) -> HedgePolicy:
        return HedgePolicy(HedgeConfig(enabled=True, **kw))

    def test_nothing_before_the_first_stage(self) -> None:
        """Below the first finished share, with no history, nothing is hedged and nothing is due."""
        d = self.policy().decide(
            total=10,
            finished_latencies=[1.0] * 8,
            running=[Running(8, 1, 5.0), Running(9, 1, 5.0)],
            history=[],
            allowance=10,
        )
        assert d.hedge == () and d.recheck_in_s is None

    def test_stage_hedges_old_stragglers_oldest_first_within_allowance(self) -> None:
        """Past a stage, running calls older than min_ratio x median get a copy, oldest first."""
        running = [Running(7, 1, 3.0), Running(8, 1, 4.0), Running(9, 1, 5.0)]
        d = self.policy(stages=(0.5,)).decide(
            total=10, finished_latencies=[1.0] * 7, running=running, history=[], allowance=2
        )
        assert d.hedge == ((9, "stage"), (8, "stage"))

    def test_no_tail_no_hedge(self) -> None:
        """Without a tail the last calls are barely older than the median: no copy, a recheck."""
        d = self.policy().decide(
            total=100,
            finished_latencies=[1.0] * 95,
            running=[Running(i, 1, 1.05) for i in range(95, 100)],
            history=[],
            allowance=15,
        )
        assert d.hedge == ()
        assert d.recheck_in_s == pytest.approx(1.25 - 1.05)

    def test_quantile_of_history_hedges_a_single_call(self) -> None:
        """A lone call older than the history's quantile gets a second copy, never a third."""
        history = sorted(float(i) for i in range(1, 101))
        policy = self.policy()
        young = policy.decide(
            total=1, finished_latencies=[], running=[Running(0, 1, 90.0)], history=history, allowance=1
        )
        assert young.hedge == () and young.recheck_in_s == pytest.approx(5.0)
        old = policy.decide(
            total=1, finished_latencies=[], running=[Running(0, 1, 96.0)], history=history, allowance=1
        )
        assert old.hedge == ((0, "quantile"),)
        twice = policy.decide(
            total=1, finished_latencies=[], running=[Running(0, 2, 200.0)], history=history, allowance=1
        )
        assert twice.hedge == ()

    def test_a_later_stage_judges_the_calls_own_age(self) -> None:
        """A call hedged at an earlier stage gets its third copy at the next stage even if
        its second copy is young: the floor applies to the call's age."""
        d = self.policy(stages=(0.5, 0.8), straggler_factor=None).decide(
            total=10, finished_latencies=[1.0] * 8, running=[Running(9, 2, 0.1, 3.0)], history=[], allowance=5
        )
        assert d.hedge == ((9, "stage"),)

    def test_stragglers_after_the_last_stage_get_fresh_copies(self) -> None:
        """After every stage, a copy older than straggler_factor x median gets a sibling, up to max_copies."""
        policy = self.policy(stages=(0.5,), max_copies=3)
        fin = [1.0] * 9
        d = policy.decide(
            total=10, finished_latencies=fin, running=[Running(9, 2, 1.3)], history=[], allowance=5
        )
        assert d.hedge == ((9, "straggler"),)
        capped = policy.decide(
            total=10, finished_latencies=fin, running=[Running(9, 3, 9.0)], history=[], allowance=5
        )
        assert capped.hedge == ()

    def test_allowance_is_a_share_of_the_fanout(self) -> None:
        """max_share of the fan-out's size, at least one, less what was already sent."""
        policy = self.policy(max_share=0.15)
        assert policy.allowance(100, 0) == 15
        assert policy.allowance(100, 15) == 0
        assert policy.allowance(3, 0) == 1

    def test_quantile_is_nearest_rank(self) -> None:
        """The q quantile of sorted values, nearest rank."""
        assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
        assert quantile([1.0, 2.0, 3.0, 4.0], 0.99) == 4.0

    def test_bad_settings_are_config_errors(self) -> None:
        """Misuse is refused at construction, naming the value."""
        with pytest.raises(ConfigError, match="stages"):
            HedgeConfig(stages=(0.9, 0.5))
        with pytest.raises(ConfigError, match="quantile"):
            HedgeConfig(quantile=1.5)

    def test_toml_hedge_table_under_the_model(self) -> None:
        """`[sub.hedge]` with `enabled = true` turns it on."""
        config = RLMConfig.from_dict(
            {"root": {"model": "a"}, "sub": {"model": "b", "hedge": {"enabled": True, "stages": [0.8, 0.95]}}}
        )
        assert config.sub is not None and config.sub.hedge.enabled and config.sub.hedge.stages == (0.8, 0.95)
        assert not config.root.hedge.enabled


BATCH10 = (
    'r = llm_batch([f"item {i}" for i in range(10)])\nanswer["content"] = "|".join(r)\nanswer["ready"] = True'
)


class TestHedgingOverHttp:
    """A straggler gets a duplicate; the first answer wins; the loser's connection is closed."""

    @pytest.mark.asyncio
    async def test_straggler_is_hedged_and_the_loser_cancelled(self) -> None:
        """Seq 3 (a sub-call) is made 60 s slow: a copy is sent, answers, and the original is
        cancelled at the server, billed its prompt only; the call is recorded once."""
        events = EventLog()
        # max_share=1: on a loaded machine other calls may look slow too; the one that is
        # 60 s slow must still get its copy.
        hedge = HedgeConfig(enabled=True, stages=(0.5,), max_share=1.0)
        async with open_sim(_sim(_code(BATCH10), script=("ok", "ok", "ok", "slow"))) as sim:
            config = sim_config(sim, sub_overrides={"hedge": hedge, "prices": PRICE})
            async with RLM(config=config, event_sinks=[events]) as rlm:
                result = await rlm.acompletion("ctx", "q")
            await _settled(sim, 11 + len(events.of(CallHedge)))  # root, ten, each copy
            subs = _subs(sim)
        assert result.response == "|".join(f"ECHO: item {i}" for i in range(10))
        slow = next(e for e in subs if e.seq == 3)
        assert slow.outcome == "cancelled"  # its connection was closed, not left to finish
        assert slow.prompt_tokens > 0 and slow.completion_tokens == 0  # billed input only
        twin = [e for e in subs if e.body_sha256 == slow.body_sha256 and e.seq != 3]
        # Its duplicates are the same request byte for byte; one answered (a second fast copy
        # may finish at the server before it sees the disconnect), any other was cancelled.
        assert set(e.outcome for e in twin) <= {"ok", "cancelled"}
        assert Counter(e.outcome for e in twin)["ok"] >= 1
        hedges = events.of(CallHedge)
        assert len(subs) == 10 + len(hedges)
        records = [r for r in result.calls if r.kind == "sub"]
        assert len(records) == 10  # one logical call each
        won = [r.hedge for r in records if r.hedge is not None and r.hedge.won]
        assert won, "the straggler's hedge answered"
        summary = won[0]
        assert summary is not None and summary.cancelled >= 1
        assert summary.extra.prompt_tokens >= slow.prompt_tokens  # the engine charged its bound
        assert summary.extra.cost_usd > 0
        assert sum(r.hedge.sent for r in records if r.hedge is not None) == len(hedges)

    @pytest.mark.asyncio
    async def test_no_tail_sends_no_hedges(self) -> None:
        """All sub-calls take the same time: no duplicate reaches the server."""
        hedge = HedgeConfig(enabled=True)
        async with open_sim(_sim(_code(BATCH10), ttft_s=0.2)) as sim:
            async with RLM(config=sim_config(sim, sub_overrides={"hedge": hedge})) as rlm:
                result = await rlm.acompletion("ctx", "q")
            subs = _subs(sim)
        assert result.response is not None
        assert len(subs) == 10 and all(e.outcome == "ok" for e in subs)

    @pytest.mark.asyncio
    async def test_no_reservation_no_hedge(self) -> None:
        """A budget with room for the fan-out but not for a copy: the straggler is not
        duplicated, and the answer still comes (late)."""
        hedge = HedgeConfig(enabled=True, stages=(0.5,), max_share=1.0)
        sim_cfg = _sim(_code(BATCH10), script=("ok", "ok", "ok", "slow"))
        sim_cfg = SimConfig(
            latency=sim_cfg.latency,
            faults=Faults(script=sim_cfg.faults.script, slow_extra_s=1.0),
            policies=sim_cfg.policies,
        )
        async with open_sim(sim_cfg) as sim:
            config = sim_config(
                sim,
                sub_overrides={"hedge": hedge, "prices": PRICE, "max_tokens": 100},
                root_overrides={"prices": ModelPrice.free()},
                budget=BudgetLimits(max_calls=11),  # the root turn and ten sub-calls
            )
            async with RLM(config=config) as rlm:
                result = await rlm.acompletion("ctx", "q")
            subs = _subs(sim)
        assert len(subs) == 10 and Counter(e.outcome for e in subs) == {"ok": 9, "slow": 1}
        refused = [r.hedge for r in result.calls if r.hedge is not None]
        assert refused and refused[0].refused >= 1 and refused[0].sent == 0


def _slow_third(policies: Policies, slow_s: float = 1.0) -> SimConfig:
    """Seq 3 (the third sub-call) answers `slow_s` late; the others at once."""
    base = _sim(policies, script=("ok", "ok", "ok", "slow"))
    return SimConfig(
        latency=base.latency, faults=Faults(script=base.faults.script, slow_extra_s=slow_s), policies=policies
    )


def _batch10(call: str) -> Policies:
    return _code(f'r = {call}\nanswer["content"] = "|".join(r)\nanswer["ready"] = True')


class TestHedgeCapsAndTrace:
    """The caps bound what the server sees; a hedged run's trace and timeline show its hedges."""

    @pytest.mark.asyncio
    @pytest.mark.parametrize(("caps", "copies"), [({"max_share": 0.1}, 1), ({"max_in_flight": 0}, 0)])
    async def test_the_caps_bound_the_copies_the_server_sees(self, caps: dict[str, Any], copies: int) -> None:
        """Two stragglers in ten: a per-fan-out share of 0.1 lets one copy through, a process
        cap of 0 in flight none; the answers come either way."""
        hedge = HedgeConfig(enabled=True, stages=(0.5,), **caps)
        base = _sim(_code(BATCH10), script=("ok", "ok", "ok", "slow", "slow"))
        sim_cfg = SimConfig(
            latency=base.latency,
            faults=Faults(script=base.faults.script, slow_extra_s=1.0),
            policies=base.policies,
        )
        events = EventLog()
        async with open_sim(sim_cfg) as sim:
            async with RLM(
                config=sim_config(sim, sub_overrides={"hedge": hedge}), event_sinks=[events]
            ) as rlm:
                result = await rlm.acompletion("ctx", "q")
            await _logged(sim, lambda log: sum(e.seq in (3, 4) for e in log) == 2)
            await anyio.sleep(0.1)
            subs = _subs(sim)
        assert result.response == "|".join(f"ECHO: item {i}" for i in range(10))
        assert len(events.of(CallHedge)) == copies
        assert 10 <= len(subs) <= 10 + copies

    @pytest.mark.asyncio
    async def test_the_trace_and_the_timeline_show_the_hedge(self) -> None:
        """The events of a hedged run fold into a call span with its hedge and its win, the
        HTML timeline's data carries them, and the copies' costs add up to the record's extra."""
        import re

        from rlm_async._events import CallHedgeEnd
        from rlm_async._trace_summary import summarize
        from rlm_async.trace_view import render_html

        hedge = HedgeConfig(enabled=True, stages=(0.5,), max_share=1.0)
        events = EventLog()
        async with open_sim(_slow_third(_code(BATCH10), slow_s=60.0)) as sim:
            config = sim_config(sim, sub_overrides={"hedge": hedge, "prices": PRICE})
            async with RLM(config=config, event_sinks=[events]) as rlm:
                result = await rlm.acompletion("ctx", "q")
        won = next(r for r in result.calls if r.hedge is not None and r.hedge.won)
        span = next(c for c in summarize(events).calls if c.call_id == won.call_id)
        assert span.hedges and span.hedge_won
        page = render_html(list(events))
        match = re.search(r'<script type="application/json" id="trace-data">(.*?)</script>', page, re.S)
        assert match is not None
        row = next(r for r in json.loads(match.group(1))["calls"] if r[6] == won.call_id)
        assert len(row[16]) == len(span.hedges) and row[17] == 1
        ends = [e for e in events.of(CallHedgeEnd) if e.call_id == won.call_id]
        assert won.hedge is not None
        losers = [e for e in ends if e.outcome != "won"]
        assert sum(e.prompt_tokens for e in losers) == won.hedge.extra.prompt_tokens
        assert sum(e.cost_usd for e in losers) == pytest.approx(won.hedge.extra.cost_usd)


class TestHedgeFromTheRepl:
    """`hedge=` on `llm_query` / `llm_batch` / `llm_batch_as_completed` overrides the model's setting."""

    @pytest.mark.asyncio
    async def test_hedge_false_sends_no_duplicate(self) -> None:
        """The model hedges, the code says `hedge=False`: the straggler gets no copy."""
        hedge = HedgeConfig(enabled=True, stages=(0.5,), max_share=1.0)
        policies = _batch10('llm_batch([f"item {i}" for i in range(10)], hedge=False)')
        async with open_sim(_slow_third(policies)) as sim:
            async with RLM(config=sim_config(sim, sub_overrides={"hedge": hedge})) as rlm:
                result = await rlm.acompletion("ctx", "q")
            subs = _subs(sim)
        assert result.response == "|".join(f"ECHO: item {i}" for i in range(10))
        assert len(subs) == 10 and Counter(e.outcome for e in subs) == {"ok": 9, "slow": 1}
        assert all(r.hedge is None for r in result.calls)

    @pytest.mark.asyncio
    async def test_hedge_true_turns_it_on_for_one_request(self) -> None:
        """The model does not hedge, the code says `hedge=True`: the straggler is duplicated
        with the model's (default) hedge settings, and the loser is cancelled at the server."""
        policies = _batch10('llm_batch([f"item {i}" for i in range(10)], hedge=True)')
        sub = {"hedge": HedgeConfig(enabled=False, stages=(0.5,), max_share=1.0)}
        events = EventLog()
        async with open_sim(_slow_third(policies, slow_s=60.0)) as sim:
            async with RLM(config=sim_config(sim, sub_overrides=sub), event_sinks=[events]) as rlm:
                result = await rlm.acompletion("ctx", "q")
            await _logged(sim, lambda log: any(e.seq == 3 and e.outcome == "cancelled" for e in log))
            subs = _subs(sim)
        assert result.response == "|".join(f"ECHO: item {i}" for i in range(10))
        slow = next(e for e in subs if e.seq == 3)
        assert slow.outcome == "cancelled"
        assert 10 < len(subs) <= 10 + len(events.of(CallHedge))

    @pytest.mark.asyncio
    async def test_a_bad_hedge_argument_is_a_clear_error(self) -> None:
        """`hedge="no"` raises a TypeError in the cell, naming the accepted values; nothing is sent."""
        code = 'try:\n    llm_query("x", hedge="no")\nexcept TypeError as e:\n    answer["content"] = str(e)\nanswer["ready"] = True'
        async with open_sim(_sim(_code(code))) as sim:
            async with RLM(config=sim_config(sim)) as rlm:
                result = await rlm.acompletion("ctx", "q")
            subs = _subs(sim)
        assert result.response == "hedge must be True, False or None, not str"
        assert subs == []

    def test_the_frame_carries_a_bool_or_nothing(self) -> None:
        """The engine reads `hedge` from a request frame as a bool or absent; anything else is a violation."""
        from rlm_async.sandbox._channel import ProtocolViolation
        from rlm_async.sandbox._protocol import parse_request

        frame = {"op": "request", "id": 1, "kind": "llm_query", "prompts": ["x"], "model": None}
        assert parse_request(frame, bytearray())[1].hedge is None
        assert parse_request({**frame, "hedge": False}, bytearray())[1].hedge is False
        with pytest.raises(ProtocolViolation, match="hedge"):
            parse_request({**frame, "hedge": 1}, bytearray())

    def test_the_system_prompt_offers_it_only_when_the_sub_model_hedges(self) -> None:
        """`hedge=False` is explained to the root model only when its sub-model hedges."""
        from rlm_async._prompts import root_system_prompt

        assert "hedge=False" not in root_system_prompt()
        assert "hedge=False" in root_system_prompt(hedging=True)


class TestHedgeBooks:
    """What a hedged call leaves behind: one journal entry (the winner), no reservation."""

    @pytest.mark.asyncio
    async def test_the_journal_keeps_the_winner_once(self, tmp_path: Path) -> None:
        """A hedged fan-out run twice with one journal: the journal holds one response per
        sub-call (not one per copy), the winner's, and the second run sends nothing."""
        import sqlite3

        hedge = HedgeConfig(enabled=True, stages=(0.5,), max_share=1.0)
        events = EventLog()
        journal = tmp_path / "run.journal"
        async with open_sim(_slow_third(_code(BATCH10), slow_s=60.0)) as sim:
            config = sim_config(
                sim, sub_overrides={"hedge": hedge, "temperature": 0.0}, journal_path=str(journal)
            )
            async with RLM(config=config, event_sinks=[events]) as rlm:
                first = await rlm.acompletion("ctx", "q")
            await _logged(sim, lambda log: any(e.seq == 3 and e.outcome == "cancelled" for e in log))
            rerun = time.monotonic()  # the simulator's clock
            async with RLM(config=config) as rlm:
                second = await rlm.acompletion("ctx", "q")
            await anyio.sleep(0.1)
            log = list(sim.log.entries)
        assert [e for e in log if e.arrival >= rerun] == []  # the re-run sent nothing
        answered = {e.body_sha256: e for e in log if e.kind == "sub" and e.outcome == "ok"}
        assert events.of(CallHedge), "the straggler was hedged"
        assert second.response == first.response == "|".join(f"ECHO: item {i}" for i in range(10))
        with sqlite3.connect(journal) as db:
            rows = db.execute("SELECT completion FROM responses WHERE model = 'sim-mini'").fetchall()
        assert len(rows) == 10
        # Each stored usage is one answer's as the server reported it, no copy's spend added in.
        served = {(e.prompt_tokens, e.completion_tokens) for e in answered.values()}
        for (completion,) in rows:
            prompt, output, _cached = json.loads(completion)["usage"]
            assert (prompt, output) in served

    @pytest.mark.asyncio
    async def test_every_reservation_is_released(self) -> None:
        """After a hedged fan-out with a cancelled loser, the query's parent ledger holds no
        reservation, and what it spent covers everything the server would bill."""
        hedge = HedgeConfig(enabled=True, stages=(0.5,), max_share=1.0)
        events = EventLog()
        parent = BudgetLedger(BudgetLimits(max_usd=1.0))
        async with open_sim(_slow_third(_code(BATCH10), slow_s=60.0)) as sim:
            config = sim_config(sim, sub_overrides={"hedge": hedge, "prices": PRICE})
            async with RLM(config=config, event_sinks=[events]) as rlm:
                result = await rlm.acompletion("ctx", "q", ledger_parent=parent)
            await _logged(sim, lambda log: any(e.seq == 3 and e.outcome == "cancelled" for e in log))
            subs = _subs(sim)
        assert result.status == "ok"
        assert Counter(e.outcome for e in subs)["cancelled"] >= 1
        assert parent.reserved_usd == 0 and parent.reserved.total_tokens == 0
        billed = sum(e.prompt_tokens * 1.0 + e.completion_tokens * 4.0 for e in subs) / 1e6
        assert float(parent.spent_usd) >= billed > 0


class TestChildRlms:
    """A child RLM is hedged call by call: a turn slower than earlier child turns gets a copy."""

    @pytest.mark.asyncio
    async def test_a_slow_child_turn_is_hedged_and_its_loser_cancelled(self) -> None:
        """One child RLM runs first (its turn is the history), then three at once; the first of
        those turns to reach the server is made 60 s slow. It gets a copy that answers, the slow
        request is cancelled at the server, and every child's answer is right."""
        code = (
            'if context == "ctx":\n'
            '    first = rlm_query("warm")\n'
            '    answer["content"] = " / ".join([first, *rlm_query_batched(["a", "b", "c"])])\n'
            "else:\n"
            '    answer["content"] = "child " + context\n'
            'answer["ready"] = True'
        )
        # seq 0: the root turn; 1: the first child's turn; 2: the first of the other three
        # (copies come later: one is sent only once an original has run past the history).
        hedge = HedgeConfig(enabled=True, min_samples=1, quantile=0.5, min_ratio=1.0)
        events = EventLog()
        async with open_sim(_sim(_code(code), script=("ok", "ok", "slow"))) as sim:
            config = sim_config(sim, max_depth=2, sub_overrides={"hedge": hedge})
            async with RLM(config=config, event_sinks=[events]) as rlm:
                result = await rlm.acompletion("ctx", "q")
            entries = await _logged(
                sim, lambda log: any(e.seq == 2 and e.outcome == "cancelled" for e in log)
            )
        assert result.response == "child warm / child a / child b / child c"
        slow = next(e for e in entries if e.seq == 2)
        assert slow.kind == "root" and slow.outcome == "cancelled"  # a child's turn, closed
        copies = [e for e in entries if e.body_sha256 == slow.body_sha256 and e.seq != 2]
        assert any(e.outcome == "ok" for e in copies)
        assert 5 < len(entries) <= 5 + len(events.of(CallHedge))
        turns = [r for r in result.calls if r.kind == "child"]
        assert len(turns) == 4  # one record per turn, however many copies
        assert any(r.hedge is not None and r.hedge.won for r in turns)


class TestCompletionOrder:
    """`llm_batch_as_completed` yields answers as they finish; leaving early cancels the rest."""

    @pytest.mark.asyncio
    async def test_yields_in_the_order_the_server_finished(self) -> None:
        """Indices come in the order the server finished them, every one exactly once."""
        code = (
            'prompts = ["x" * (30 * (6 - i)) for i in range(6)]\n'
            "order = [i for i, a in llm_batch_as_completed(prompts)]\n"
            'answer["content"] = ",".join(map(str, order))\nanswer["ready"] = True'
        )
        # Replies echo the prompt (up to 200 characters): about 7 tokens x 20 ms apart.
        async with open_sim(_sim(_code(code), output_s_per_token=0.02)) as sim:
            async with RLM(config=sim_config(sim, completion_order=True)) as rlm:
                result = await rlm.acompletion("ctx", "q")
            subs = sorted(_subs(sim), key=lambda e: e.finish)
        assert result.response is not None
        order = [int(i) for i in result.response.split(",")]
        assert sorted(order) == list(range(6))
        lengths = [e.completion_tokens for e in subs]
        assert lengths == sorted(lengths)  # the server finished short replies first ...
        assert order == sorted(range(6), key=lambda i: 6 - i)  # ... and they came back first

    @pytest.mark.asyncio
    async def test_leaving_early_cancels_the_rest(self) -> None:
        """Two answers taken, then `break`: the four slow sub-calls are cancelled at the
        server and their reservations refunded (the query's spend is the two answers only)."""
        code = (
            "seen = []\n"
            'for i, a in llm_batch_as_completed([f"item {k}" for k in range(6)]):\n'
            "    seen.append(i)\n"
            "    if len(seen) == 2:\n"
            "        break\n"
            'answer["content"] = repr(sorted(seen))\nanswer["ready"] = True'
        )
        async with open_sim(
            _sim(_code(code), script=("ok", "ok", "ok", "slow", "slow", "slow", "slow"))
        ) as sim:
            config = sim_config(sim, sub_overrides={"prices": PRICE}, budget=BudgetLimits(max_usd=1.0))
            async with RLM(config=config) as rlm:
                result = await rlm.acompletion("ctx", "q")
            await _settled(sim, 7)
            subs = _subs(sim)
        assert Counter(e.outcome for e in subs) == {"ok": 2, "cancelled": 4}
        sub_records = [r for r in result.calls if r.kind == "sub"]
        assert Counter(r.status for r in sub_records) == {"ok": 2, "cancelled": 4}
        paid = sum(e.prompt_tokens * 1.0 + e.completion_tokens * 4.0 for e in subs if e.outcome == "ok") / 1e6
        assert sum(r.cost_usd for r in sub_records) == pytest.approx(paid, rel=1e-6)

    @pytest.mark.asyncio
    async def test_leaving_early_cancels_hedge_copies_too(self) -> None:
        """Hedging on, four stragglers each with a copy in flight when the code stops
        iterating: every original and every copy is cancelled at the server, and nothing
        stays reserved."""
        code = (
            "import time\n"
            "seen = []\n"
            'for i, a in llm_batch_as_completed([f"item {k}" for k in range(6)]):\n'
            "    seen.append(i)\n"
            "    if len(seen) == 2:\n"
            "        time.sleep(1.0)  # the stragglers' copies go out meanwhile\n"
            "        break\n"
            'answer["content"] = repr(sorted(seen))\nanswer["ready"] = True'
        )
        hedge = HedgeConfig(enabled=True, stages=(0.3,), max_share=1.0, straggler_factor=None)
        events = EventLog()
        parent = BudgetLedger(BudgetLimits(max_usd=1.0))
        async with open_sim(_sim(_code(code), script=("ok", "ok", "ok") + ("slow",) * 20)) as sim:
            config = sim_config(sim, sub_overrides={"hedge": hedge, "prices": PRICE})
            async with RLM(config=config, event_sinks=[events]) as rlm:
                result = await rlm.acompletion("ctx", "q", ledger_parent=parent)
            copies = len(events.of(CallHedge))
            await _logged(sim, lambda log: sum(e.outcome == "cancelled" for e in log) >= 4)
            await anyio.sleep(0.2)
            subs = _subs(sim)
        assert result.response == "[0, 1]"
        assert copies == 4
        late = [e for e in subs if e.seq >= 3]
        assert len(late) > 4 and all(e.outcome == "cancelled" for e in late)  # copies reached it
        assert parent.reserved_usd == 0
        billed = sum(e.prompt_tokens * 1.0 + e.completion_tokens * 4.0 for e in subs) / 1e6
        assert float(parent.spent_usd) >= billed

    def test_system_prompt_mentions_it_only_when_enabled(self) -> None:
        """The root prompt names llm_batch_as_completed only with completion_order=True."""
        from rlm_async._prompts import root_system_prompt

        assert "llm_batch_as_completed" not in root_system_prompt()
        assert "llm_batch_as_completed" in root_system_prompt(completion_order=True)


class TestHedgeBudgetFuzz:
    """Seeded: random dollar caps, hedging on, a lognormal tail; spend never passes the cap."""

    @pytest.mark.parametrize("seed", range(6))
    @pytest.mark.asyncio
    async def test_spend_never_exceeds_the_cap(self, seed: int) -> None:
        """Neither the ledger's spend nor what the server would bill exceeds the query's cap."""
        rng = random.Random(seed)
        n = rng.randint(8, 30)
        cap = rng.uniform(0.00005, 0.003)
        code = f'r = llm_batch([("p{seed} " * (1 + i % 7)) + str(i) for i in range({n})])\nanswer["content"] = str(len(r))\nanswer["ready"] = True'
        hedge = HedgeConfig(enabled=True, stages=(0.5, 0.8), max_share=1.0, min_ratio=1.0)
        async with open_sim(_sim(_code(code), sigma=0.8, ttft_s=0.03)) as sim:
            config = sim_config(
                sim,
                sub_overrides={"hedge": hedge, "prices": PRICE, "max_tokens": rng.choice([50, 200, 1000])},
                budget=BudgetLimits(max_usd=cap),
                governor=GovernorConfig(chars_per_token=4.0),
            )
            async with RLM(config=config) as rlm:
                result = await rlm.acompletion("ctx", "q")
            await anyio.sleep(0.3)  # let the server log disconnects it has seen
            subs = _subs(sim)
        assert result.total.cost_usd <= cap + 1e-12
        billed = sum(e.prompt_tokens * 1.0 + e.completion_tokens * 4.0 for e in subs) / 1e6
        assert billed <= cap + 1e-12


class TestSimulatorTail:
    """The simulator's lognormal tail and the cancel frame's validation."""

    def test_sigma_keeps_the_median_and_stretches_the_tail(self) -> None:
        """exp(sigma z): the median draw is unchanged, p99 is exp(2.326 sigma) x it."""
        import math

        model = LatencyModel(sub=KindLatency(ttft_s=0.8, sigma=0.6))
        assert model.latency("sub", prompt_tokens=0, completion_tokens=0, jitter_u=0.5) == pytest.approx(0.8)
        p99 = model.latency("sub", prompt_tokens=0, completion_tokens=0, jitter_u=0.99)
        assert p99 == pytest.approx(0.8 * math.exp(0.6 * 2.3263), rel=1e-3)
        assert model.lower_bound("sub", prompt_tokens=0, completion_tokens=0) > 0

    def test_cancel_frames_are_validated(self) -> None:
        """A cancel carries an integer id and nothing else; anything else is a violation."""
        from rlm_async.sandbox._channel import ProtocolViolation
        from rlm_async.sandbox._protocol import parse_cancel

        assert parse_cancel({"op": "cancel", "id": 3}) == 3
        for bad in ({"op": "cancel"}, {"op": "cancel", "id": True}, {"op": "cancel", "id": 1, "x": 2}):
            with pytest.raises(ProtocolViolation):
                parse_cancel(bad)
