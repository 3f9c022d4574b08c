"""Issue 20: nothing a model writes or a server sends may stall, exhaust or overspend the
engine. One class per item of the issue, each reproducing what failed (over real HTTP on
the simulator where the server's view matters), then the hostile-reply fuzz.

Assertions are on what the server saw (its request log), what the result says, and what
the code was shown; time appears only as generous upper bounds (a stall of the event loop
is measured as the longest gap between ticks of a 50 ms heartbeat, bounded at seconds)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import EventLog, open_sim, sandbox_config, sim_config
from test_e2e import worker_processes_left
from test_engine import Model, repl
from test_engine import run as run_scripted

from rlm_async._engine.slots import WorkerSlots
from rlm_async._events import CallFinish, SubcallsRefused, UsageEstimated, WorkerStart
from rlm_async._governor import (
    BudgetLimits,
    CharsPerTokenEstimator,
    GovernorConfig,
    ModelPrice,
    TokenEstimator,
    TokenizerEstimator,
    Utf8BytesEstimator,
)
from rlm_async._journal.keys import decode_completion as _decode_completion
from rlm_async._journal.keys import encode_completion as _encode_completion
from rlm_async._prompts import describe_context, first_user_message
from rlm_async._result import RLMResult
from rlm_async._rlm import RLM
from rlm_async._text import scrub
from rlm_async._trace import TraceWriter, event_to_json
from rlm_async._types import Completion, Message, ModelRequest, Usage
from rlm_async.sim import Policies, PolicySpec, SimConfig, SimServer
from rlm_async.sim._tokens import count_tokens, prompt_tokens
from rlm_async.transport import _json_or_none, _parse_completion
from rlm_async.transport import encode_body as _encode_body

pytestmark = pytest.mark.e2e


def scripted(*replies: str) -> Policies:
    """The simulator's root model says `replies[turn]` (the last one repeats)."""
    return Policies(root=PolicySpec(name="script", options={"replies": list(replies)}))


async def run_sim(
    sim: SimServer, context: Any = "the context", query: str = "the query", **config: Any
) -> tuple[RLMResult, EventLog]:
    events = EventLog()
    async with RLM(config=sim_config(sim, **config), event_sinks=[events]) as rlm:
        result = await rlm.acompletion(context, query)
    return result, events


@asynccontextmanager
async def heartbeat(period: float = 0.05) -> AsyncIterator[list[float]]:
    """The longest gap between ticks of a task that sleeps `period`: how long the event loop
    was held by something else (yielded as a one-item list, filled in on exit)."""
    gap = [0.0]
    async with anyio.create_task_group() as tg:

        async def beat() -> None:
            last = anyio.current_time()
            while True:
                await anyio.sleep(period)
                now = anyio.current_time()
                gap[0] = max(gap[0], now - last - period)
                last = now

        tg.start_soon(beat)
        try:
            yield gap
        finally:
            tg.cancel_scope.cancel()


# ============================================================================ 1. admission


class TestAdmissionBeforeWork:
    @pytest.mark.asyncio
    async def test_a_huge_batch_under_a_call_cap_is_refused_in_one_piece(self) -> None:
        """llm_batch of 100,000 prompts under max_calls=10: the server sees at most 10
        requests, the result holds a handful of call records (not 100,000), says the budget
        refused the rest, and the event loop is never held for seconds (before: 33.7 s
        blocked, 100,001 records, 1.46 GB)."""
        code = "r = llm_batch(['x'] * 100_000)\nprint('ERRORS', sum(a.startswith('Error') for a in r))"
        config = SimConfig(policies=scripted(repl(code), "FINAL(done)"))
        async with open_sim(config) as sim, heartbeat() as gap:
            result, events = await run_sim(sim, budget=BudgetLimits(max_calls=10, max_seconds=60))
            seen = len(sim.log.entries)
        assert seen <= 10
        assert len(result.calls) <= 12
        assert result.status == "budget_exceeded" and result.limit_hit == "calls"
        assert result.total.refused_calls >= 100_000 - 10
        refused = events.of(SubcallsRefused)
        assert len(refused) == 1 and refused[0].count >= 99_990
        assert gap[0] < 3.0, f"the event loop was held for {gap[0]:.1f} s"

    @pytest.mark.asyncio
    async def test_pending_subcalls_are_capped_per_query(self) -> None:
        """With no budget at all, a batch past max_pending_subcalls runs only the first
        max_pending_subcalls prompts; the rest hold one shared refusal saying why."""
        code = (
            "r = llm_batch([f'p{i}' for i in range(50)])\n"
            "print('OK', sum(not a.startswith('Error') for a in r))\n"
            "print('WHY', [a for a in r if a.startswith('Error')][0][:200])"
        )
        m = Model([repl(code), "FINAL(done)"])
        result = await run_scripted(m, max_pending_subcalls=20)
        obs = m.observation(0)
        assert "OK 20" in obs and "max_pending_subcalls" in obs
        assert len(m.sub_requests) == 20
        assert result.status == "budget_exceeded" and result.failed_subcalls == 30

    @pytest.mark.asyncio
    async def test_a_batch_past_max_batch_prompts_is_one_error_in_the_repl(self) -> None:
        """A call with more prompts than SandboxConfig.max_batch_prompts raises ValueError
        in the REPL before anything is sent (before: the engine read every prompt)."""
        code = "try:\n    llm_batch(['x'] * 5_001)\nexcept ValueError as e:\n    print('REFUSED', e)"
        m = Model([repl(code), "FINAL(done)"])
        await run_scripted(m, sandbox=sandbox_config(max_batch_prompts=5_000))
        assert "REFUSED" in m.observation(0) and "max_batch_prompts" in m.observation(0)
        assert m.sub_requests == []


# ============================================================================ 2. worker cap


class TestWorkerCap:
    @pytest.mark.asyncio
    async def test_child_rlms_wait_for_a_slot_and_the_run_completes(self) -> None:
        """max_depth=2, rlm_query_batched over 6 tasks, max_workers=3: never more than 3
        workers alive at once (counted from worker.start/worker.kill events), every child
        still answers, and the answer is right (before: 101 workers at once for 100 tasks)."""
        config = SimConfig(
            policies=Policies(
                root=PolicySpec(
                    name="rlm",
                    options={
                        "chunks": 6,
                        "fanout": "rlm_query_batched",
                        "child_chunks": 1,
                        "finish": "final",
                    },
                )
            )
        )
        from rlm_async.workloads import oolong_counting

        w = oolong_counting("16k", seed=8)
        async with open_sim(config) as sim:
            result, events = await run_sim(sim, w.context, w.query, max_depth=2, max_workers=3)
        assert result.status == "ok" and w.score(result.response)
        live = peak = 0
        for e in events:
            if e.kind == "worker.start":
                live += 1
                peak = max(peak, live)
            elif e.kind == "worker.kill":
                live -= 1
        assert len(events.of(WorkerStart)) == 7
        assert peak <= 3

    @pytest.mark.asyncio
    async def test_slots_never_deadlock_nested_holders(self) -> None:
        """Depth 3, three children per node, cap 3 (the least max_depth allows): every node
        of the 13-node tree gets its slot and finishes; at most 3 are held at once."""
        slots = WorkerSlots(3)
        done: list[int] = []

        async def node(depth: int) -> None:
            async with slots.hold(below=2 - depth):
                await anyio.sleep(0.001)
                if depth < 2:
                    async with anyio.create_task_group() as tg:
                        for _ in range(3):
                            tg.start_soon(node, depth + 1)
                done.append(depth)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for _ in range(2):  # two queries at once
                    tg.start_soon(node, 0)
        assert len(done) == 26 and slots.peak <= 3 and slots.live == 0


# ============================================================================ 3. usage


class TestUnreportedUsage:
    @pytest.mark.asyncio
    async def test_a_server_without_usage_is_charged_the_reservation(self) -> None:
        """A server that reports no usage, max_usd=0.50 at $1 per million tokens, 100 calls
        of 50,000 characters: the calls are charged at their reservation, so the budget
        stops them (before: all 100 sent, recorded as 0 tokens and $0, status ok); the
        result says usage was estimated, and a usage.estimated event says so per call."""
        code = "for i in range(100):\n    llm_query('w' * 50_000)\nprint('ALL SENT')"
        price = ModelPrice(input_per_mtok=1.0, output_per_mtok=1.0)
        config = SimConfig(report_usage=False, policies=scripted(repl(code), "FINAL(done)"))
        async with open_sim(config) as sim:
            result, events = await run_sim(
                sim,
                budget=BudgetLimits(max_usd=0.50, max_total_tokens=1_000_000),
                root_overrides={"prices": price},
                sub_overrides={"prices": price},
            )
            subs = sim.log.of_kind("sub")
        assert len(subs) < 15
        assert result.usage_estimated and result.status == "budget_exceeded"
        assert 0 < result.total.cost_usd <= 0.50
        assert result.total.prompt_tokens >= sum(e.prompt_tokens for e in subs)
        assert len(events.of(UsageEstimated)) == result.total.calls
        assert all(r.usage_estimated for r in result.calls if r.status == "ok")

    def test_a_body_without_usage_is_marked_unreported(self) -> None:
        """The transport marks a completion without usage (or with zero prompt tokens)."""
        body: dict[str, Any] = {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}
        assert not _parse_completion(body, {}, "m", "e").usage_reported
        body["usage"] = {"prompt_tokens": 0, "completion_tokens": 0}
        assert not _parse_completion(body, {}, "m", "e").usage_reported
        body["usage"] = {"prompt_tokens": 5, "completion_tokens": 1}
        assert _parse_completion(body, {}, "m", "e").usage_reported


# ============================================================================ 4. surrogates


HOSTILE_PIECES = [
    "\ud800",
    "\udfff",
    "\udc80abc",
    "a\ud83d",  # half of an emoji pair
    "\x00",
    "\x00\x00\x00",
    "\ufffd",
    "\U0001f600",
    "```",
    "```repl\n",
    "FINAL(",
    "\r\n",
    "\u202e",
    "\\ud800",
    '"',
    "\x7f",
    "é",
]


def hostile_text(rng: random.Random, n: int = 40) -> str:
    parts = []
    for _ in range(rng.randint(1, n)):
        if rng.random() < 0.5:
            parts.append(rng.choice(HOSTILE_PIECES))
        else:
            parts.append(chr(rng.randint(0, 0x10FFFF)))
    return "".join(parts)


class TestHostileText:
    def test_fuzz_every_boundary_survives_hostile_strings(self, tmp_path: Path) -> None:
        """2,000 random strings of lone surrogates, NULs, fences and random code points pass
        every boundary text crosses without an exception, and what comes out is valid
        UTF-8: the JSON body, a server's reply, the context preview, the first prompt, the
        journal, the trace."""
        rng = random.Random(20)
        writer = TraceWriter(tmp_path)
        for i in range(2_000):
            text = hostile_text(rng)
            assert "\ud800" not in scrub(text)
            scrub(text).encode("utf-8")
            request = ModelRequest(model="m", messages=(Message("user", text), Message("assistant", text)))
            json.loads(_encode_body(request).decode("utf-8"))
            body = {"choices": [{"message": {"content": text}}], "usage": {"prompt_tokens": 1}}
            raw = json.dumps(body).encode()  # a server escapes surrogates: "\\ud800"
            reply = _parse_completion(_json_or_none(raw), {}, "m", "e").text
            reply.encode("utf-8")
            invalid = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
            _parse_completion(_json_or_none(invalid), {}, "m", "e").text.encode("utf-8")
            meta = describe_context(text)
            first_user_message(meta, text).encode("utf-8")
            stored = _encode_completion(Completion(text=text, usage=Usage(1, 1), model="m"))
            stored.encode("utf-8")
            assert _decode_completion(stored).text == scrub(text)
            event = CallFinish(
                time=float(i),
                query_id="q1",
                node_id="n1",
                depth=0,
                call_id="c1",
                status="error",
                prompt_tokens=0,
                cached_tokens=0,
                completion_tokens=0,
                cost_usd=0.0,
                latency_s=0.0,
                attempts=1,
                from_journal=False,
                text=text,
                error=text,
            )
            event_to_json(event)
            writer(event)
        writer.close()
        for path in tmp_path.iterdir():
            path.read_bytes().decode("utf-8")

    @pytest.mark.asyncio
    async def test_a_lone_surrogate_in_a_reply_or_the_context_ends_with_a_status(self) -> None:
        """ "\\ud800" in the root model's reply and in the first characters of a str
        context: the query returns a result (before: UnicodeEncodeError from acompletion,
        and the reply's raw invalid UTF-8 was a "malformed response")."""
        reply = "Let me look \ud800 at it.\n" + repl("print('SEEN', len(context))")
        config = SimConfig(policies=scripted(reply, "FINAL(done \udfff)"))
        async with open_sim(config) as sim:
            result, _ = await run_sim(sim, context="ab\ud800cd" + "x" * 100)
            roots = sim.log.of_kind("root")
        # The simulator sends the surrogate as raw (invalid) UTF-8: each bad byte is U+FFFD.
        assert result.status == "ok" and result.response is not None
        assert result.response.startswith("done \ufffd") and set(result.response[5:]) == {"\ufffd"}
        assert len(roots) == 2


# ============================================================================ 5-7. worker, turn


class TestWorkerReplaced:
    @pytest.mark.asyncio
    async def test_a_hung_final_var_is_reported_and_the_next_cell_runs(self) -> None:
        """FINAL_VAR(x) where str(x) never returns: the model is told it hung (not that x
        does not exist), and its next cell runs in a fresh worker (before: "worker is not
        running ... call restart()" for every later cell)."""
        hang = "class Hang:\n    def __str__(self):\n        while True:\n            pass\nx = Hang()"
        m = Model([repl(hang) + "\nFINAL_VAR(x)", repl("print('ALIVE')"), "FINAL(done)"])
        result = await run_scripted(m, sandbox=sandbox_config(cell_timeout_s=2.0))
        first, second = m.observation(0), m.observation(1)
        assert "did not finish" in first and "no variable named" not in first
        assert "fresh one started" in first
        assert "ALIVE" in second and "not running" not in second
        assert result.status == "ok" and result.response == "done"

    @pytest.mark.asyncio
    async def test_closing_fd_1_and_2_is_reported_and_the_worker_replaced(self) -> None:
        """Code that closes fds 1 and 2: that cell reports stream_closed, the worker is
        replaced, and the next cell's output is seen (before: every later cell's output
        was dropped and reported as output_limit)."""
        m = Model([repl("import os\nos.close(1)\nos.close(2)"), repl("print('BACK')"), "FINAL(done)"])
        result = await run_scripted(m)
        first, second = m.observation(0), m.observation(1)
        assert "stream_closed" in first and "stdout (fd 1) was closed" in first
        assert "BACK" in second and "output_limit" not in second
        assert result.status == "ok"

    @pytest.mark.asyncio
    async def test_redirecting_fd_1_is_reported(self) -> None:
        """os.dup2 onto fd 1 is reported as a redirect."""
        code = "import os\nfd = os.open('/dev/null', os.O_WRONLY)\nos.dup2(fd, 1)"
        m = Model([repl(code), repl("print('BACK')"), "FINAL(done)"])
        await run_scripted(m)
        assert "stdout (fd 1) was redirected" in m.observation(0)
        assert "BACK" in m.observation(1)


class TestTurnBound:
    @pytest.mark.asyncio
    async def test_a_reply_of_busy_blocks_is_stopped_at_the_turn_bound(self) -> None:
        """Five busy-loop blocks under turn_timeout_s=2 (cell_timeout_s 30): the first is
        stopped, blocks 2 to 5 are not run and the model is told so, and the next reply
        runs in a fresh worker (before: each block ran to the cell timeout: 50 blocks,
        about 50 minutes for one turn)."""
        busy = repl("while True:\n    pass")
        m = Model(["\n".join([busy] * 5), repl("print('NEXT')"), "FINAL(done)"])
        result = await run_scripted(m, turn_timeout_s=2.0)
        first = m.observation(0)
        assert "turn_timeout_s=2" in first and "blocks 2 to 5 of 5 did not run" in first
        assert "NEXT" in m.observation(1)
        assert result.status == "ok"

    @pytest.mark.asyncio
    async def test_thousands_of_blocks_make_a_bounded_observation(self) -> None:
        """A reply of 3,000 printing blocks: the next prompt is bounded by four times
        output_limit_chars, however many blocks there were."""
        m = Model(["\n".join(repl(f"print('{i}' * 50)") for i in range(3_000)), "FINAL(done)"])
        await run_scripted(m, output_limit_chars=1_000)
        assert len(m.observation(0)) < 4_000 + 500


# ============================================================================ 8. partial


class TestFailedSubcalls:
    @pytest.mark.asyncio
    async def test_a_run_whose_every_subcall_failed_is_partial(self) -> None:
        """Four sub-calls over the server's context window all fail with
        context_length_exceeded (not retried); the run ends "partial" with
        failed_subcalls=4, never a plain "ok" (before: status ok)."""
        code = "r = llm_batch(['a', 'b', 'c', 'd'])\nprint(sum(a.startswith('Error') for a in r))"
        config = SimConfig(context_window=4096, policies=scripted(repl(code), "FINAL(done)"))
        async with open_sim(config) as sim:
            result, _ = await run_sim(
                sim, root_overrides={"max_tokens": 256}, sub_overrides={"max_tokens": 4096}
            )
            subs = sim.log.of_kind("sub")
        assert len(subs) == 4  # refused at once by the server, never retried
        assert result.status == "partial" and result.failed_subcalls == 4
        assert result.detail is not None and "4 sub-call(s) failed" in result.detail
        assert "context" in result.detail
        assert result.to_dict()["failed_subcalls"] == 4


# ============================================================================ 9. reservations


class TestTighterReservations:
    def _fill(self, estimator: TokenEstimator, cap: int, prompt: str) -> int:
        """How many 50 KB sub-calls fit at once under `cap` total tokens (a fan-out's
        prompts all reserve at once, and those that do not fit are refused)."""
        request = ModelRequest(
            model="m", messages=(Message("system", "sys"), Message("user", prompt)), max_tokens=256
        )
        return cap // (estimator.prompt_tokens(request) + 256)

    def test_a_known_tokenizer_admits_about_four_times_the_byte_bound(self) -> None:
        """500 prompts of 50 KB under max_total_tokens=1M: the byte bound admits 19 at once
        (about 24 % of the cap in real tokens, the issue's number); the simulator's 4
        characters a token, or its exact count plugged in as a tokenizer, admit about 78."""
        prompt = "w" * 50_000
        actual = prompt_tokens([Message("system", "sys"), Message("user", prompt)]) + 256
        by_bytes = self._fill(Utf8BytesEstimator(), 1_000_000, prompt)
        by_ratio = self._fill(CharsPerTokenEstimator(chars_per_token=4), 1_000_000, prompt)
        by_count = self._fill(TokenizerEstimator(count_tokens=count_tokens), 1_000_000, prompt)
        assert by_bytes == 19 and by_bytes * actual < 0.3 * 1_000_000
        assert by_ratio >= 75 and by_count >= 75
        assert by_count * actual <= 1_000_000

    @pytest.mark.asyncio
    async def test_on_the_simulator_chars_per_token_uses_more_of_the_cap(self) -> None:
        """The same fan-out (100 prompts of 50 KB, max_total_tokens=1M) through the engine:
        the server serves about four times as many sub-calls with chars_per_token=4 as with
        the byte bound, and the tokens it reports never cross the cap."""
        code = "r = llm_batch(['w' * 50_000 + str(i) for i in range(100)])"
        served: dict[str, int] = {}
        for name, governor in (("bytes", GovernorConfig()), ("ratio", GovernorConfig(chars_per_token=4))):
            config = SimConfig(policies=scripted(repl(code), "FINAL(done)"))
            async with open_sim(config) as sim:
                result, _ = await run_sim(
                    sim,
                    governor=governor,
                    budget=BudgetLimits(max_total_tokens=1_000_000),
                    root_overrides={"max_tokens": 256},
                    sub_overrides={"max_tokens": 256},
                )
                served[name] = len(sim.log.of_kind("sub"))
                used = sum(e.prompt_tokens + e.completion_tokens for e in sim.log.entries)
            assert used <= 1_000_000 and result.status == "budget_exceeded"
        assert served["ratio"] >= 3 * served["bytes"], served


# ============================================================================ the fuzz


def hostile_reply(rng: random.Random) -> str:
    """One random hostile root-model reply."""
    kind = rng.randrange(12)
    if kind == 0:
        return repl(f"r = llm_batch(['x'] * {rng.choice([50_000, 150_000, 2_000_000])})\nprint(len(r))")
    if kind == 1:
        return "look \ud800 here " + hostile_text(rng) + "\n" + repl("print('\\udfff', '\\x00')")
    if kind == 2:
        return "\x00" * rng.randint(1, 1000) + repl("print('nul')")
    if kind == 3:
        return "```repl\nprint('unclosed'" + hostile_text(rng)
    if kind == 4:
        return "\n".join(repl("pass") for _ in range(rng.randint(500, 3000)))
    if kind == 5:
        return repl("while True:\n    pass") * 3
    if kind == 6:
        return repl("import os\nos.close(1)\nos.close(2)")
    if kind == 7:
        return repl("class H:\n    def __str__(self):\n        while 1: pass\nh = H()") + "\nFINAL_VAR(h)"
    if kind == 8:
        return repl("for i in range(30):\n    llm_query('w' * 20_000)")
    if kind == 9:
        return repl("print('y' * 10_000_000)")
    if kind == 10:
        return "FINAL_VAR(" + hostile_text(rng, 5)
    return hostile_text(rng, 200)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class TestHostileReplyFuzz:
    @pytest.mark.slow
    @pytest.mark.asyncio
    async def test_random_hostile_replies_always_end_with_a_status(self) -> None:
        """Ten concurrent queries, each with a seeded random script of hostile replies
        (huge batches, surrogates, NULs, unclosed fences, thousands of blocks, busy loops,
        closed streams, hung FINAL_VAR), run by the real engine on the simulator: every
        query returns a result with a status within its deadline plus one second, the
        engine's memory grows by less than 1 GB, no more workers live at once than
        max_workers, and no worker process is left afterwards."""
        rng = random.Random(2020)
        deadline = 25.0
        scripts = [[hostile_reply(rng) for _ in range(4)] + ["FINAL(done)"] for _ in range(10)]
        finished: list[tuple[RLMResult, float]] = []
        events = EventLog()
        base = rss_bytes()
        peak = [base]

        async def sample() -> None:
            while True:
                peak[0] = max(peak[0], rss_bytes())
                await anyio.sleep(0.1)

        async def one(query: str, rlm: RLM) -> None:
            started = anyio.current_time()
            result = await rlm.acompletion("the context " * 50, query)
            finished.append((result, anyio.current_time() - started))

        # Every query its own script: the simulator picks the replies by the query line.
        by_query = {f"fuzz {i}": script for i, script in enumerate(scripts)}
        policies = Policies(root=PolicySpec(name="script", options={"by_query": by_query}))
        async with open_sim(SimConfig(policies=policies)) as sim:
            config = sim_config(
                sim,
                budget=BudgetLimits(max_seconds=deadline, max_calls=60),
                max_iterations=6,
                turn_timeout_s=4.0,
                max_workers=6,
                max_pending_subcalls=2_000,
                sandbox=sandbox_config(cell_timeout_s=2.0),
            )
            async with RLM(config=config, event_sinks=[events]) as rlm:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(sample)
                    async with anyio.create_task_group() as queries:
                        for query in by_query:
                            queries.start_soon(one, query, rlm)
                    tg.cancel_scope.cancel()
        assert len(finished) == len(scripts)
        for result, took in finished:
            assert result.status in ("ok", "partial", "max_iterations", "budget_exceeded", "timeout", "error")
            assert took <= deadline + 1.0, (result.status, took)
        assert peak[0] - base < 1 << 30, f"RSS grew by {(peak[0] - base) >> 20} MB"
        live = most = 0
        for e in events:
            live += {"worker.start": 1, "worker.kill": -1}.get(e.kind, 0)
            most = max(most, live)
        assert most <= 6
        pids = {e.pid for e in events.of(WorkerStart)}
        uids = {e.uid for e in events.of(WorkerStart) if e.uid is not None}
        assert worker_processes_left(pids, uids) == []
