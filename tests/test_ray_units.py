"""The Ray runner's parts that need no cluster: pacing, the budget's books, an actor's
lease stock and leased transport, and the journal that survives a node. The cluster
itself is tested end to end in tests/test_e2e_ray.py.
"""

from __future__ import annotations

import os
import random
import stat
from decimal import Decimal
from pathlib import Path
from typing import cast

import anyio
import pytest

from rlm_async._governor import ManualClock, RequestTooLarge
from rlm_async._governor._estimate import CharsPerTokenEstimator
from rlm_async._types import Completion, Message, ModelRequest, Usage
from rlm_async.exceptions import ConfigError
from rlm_async.ray import BudgetBook, Coordinator, PacedGrants, Pacing, local_token
from rlm_async.ray._journal_store import CURRENT_QUERY, JournalStore, ReplicatedJournal, StoreRow
from rlm_async.ray._local import AUTH_ENV
from rlm_async.ray._pool import LeasedTransport, LeasePool
from rlm_async.testing import ScriptedTransport

pytestmark = pytest.mark.anyio


def request(content: str = "What is 6 x 7?", model: str = "m") -> ModelRequest:
    return ModelRequest(
        model=model,
        messages=(Message("system", "Be terse."), Message("user", content)),
        temperature=0.0,
        max_tokens=16,
    )


class TestPacing:
    def test_the_rate_leaves_room_for_a_burst_and_a_lease_lifetime(self) -> None:
        """600 a minute over 10-second windows, a burst of 10 and 2-second leases: the
        coordinator grants (100 - 10) / 12 = 7.5 a second, 75% of the limit."""
        p = Pacing(limit_per_minute=600, window_s=10, ttl_s=2, burst_share=0.1)
        assert (p.per_window, p.burst, p.rate) == (100, 10, 7.5)
        assert p.share_of_limit == pytest.approx(0.75)

    def test_nonsense_pacing_is_refused_naming_the_values(self) -> None:
        """A zero limit or a burst share of 1 cannot be paced."""
        with pytest.raises(ConfigError, match="per-minute limit of 0"):
            Pacing(limit_per_minute=0)
        with pytest.raises(ConfigError, match="burst_share"):
            Pacing(limit_per_minute=60, burst_share=1.0)

    @pytest.mark.parametrize("seed", range(5))
    def test_no_window_ever_holds_more_than_its_share_however_grants_are_spent(self, seed: int) -> None:
        """Twenty greedy holders ask every 50 ms for 60 s and spend each grant at a random
        moment of its lifetime, most at the very end (the worst case): no 10-second window
        of spending holds more than the limit's 10 seconds' worth."""
        rng = random.Random(seed)
        pacing = Pacing(limit_per_minute=600, window_s=10, ttl_s=2)
        grants = PacedGrants(pacing, now=0.0)
        spends: list[float] = []
        t = 0.0
        while t < 60:
            for _ in range(20):
                n = grants.grant(rng.randint(1, 5), at_least=1, now=t)
                for _ in range(n):
                    late = rng.random() < 0.7
                    spends.append(t + (pacing.ttl_s if late else rng.random() * pacing.ttl_s))
            t += 0.05
        spends.sort()
        j = most = 0
        for i, s in enumerate(spends):
            while spends[j] <= s - pacing.window_s:
                j += 1
            most = max(most, i - j + 1)
        assert most <= pacing.per_window
        assert len(spends) > 0.9 * pacing.rate * 60  # and the pace is actually used


class TestCoordinator:
    async def test_a_take_waits_in_the_coordinator_until_the_bucket_refills(self) -> None:
        """With the burst spent, a take sleeps on the coordinator's clock (no polling round
        trips) and says how long it waited, so the holder's lease lifetime starts then."""
        clock = ManualClock()
        c = Coordinator("e", {"m": (60, None)}, window_s=10, ttl_s=2, clock=clock, sleep=clock.sleep)
        assert c.limited() == [("m", "requests")]
        first = await c.take("m", "requests", 100, 1)
        assert first == (1, 0.0)  # the burst: 10 s * 1/s * 0.1
        got: list[tuple[int, float]] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _append(got, c.take("m", "requests", 1, 1)))
            await anyio.wait_all_tasks_blocked()
            assert got == []
            while not got:
                clock.advance(0.25)
                await anyio.wait_all_tasks_blocked()
        assert got[0][0] == 1 and got[0][1] > 0
        unlimited = await c.take("m", "tokens", 500, 500)
        assert unlimited == (500, 0.0)

    async def test_a_need_above_the_largest_grant_is_refused_at_once(self) -> None:
        """A request bigger than the bucket can ever hold gets 0 instead of waiting forever."""
        c = Coordinator("e", {"m": (None, 6000)})
        assert c.largest("m", "tokens") == 100
        assert await c.take("m", "tokens", 101, 101) == (0, 0.0)


async def _append(out: list[tuple[int, float]], aw: object) -> None:
    out.append(await aw)  # type: ignore[misc]


class TestBudgetBook:
    def test_blocks_are_granted_whole_or_not_at_all_within_the_cap(self) -> None:
        """$1 cap, $0.25 spent by an earlier run: $0.5 then $0.25 fit, a further $0.01 does
        not; a block never splits, so an actor never holds less than it asked for."""
        book = BudgetBook(1.0, None, spent_before=(0.25, 0))
        assert book.grow("a", Decimal("0.5"), 0) == (Decimal("0.5"), 0)
        assert book.grow("b", Decimal("0.25"), 0) == (Decimal("0.25"), 0)
        assert book.grow("b", Decimal("0.01"), 0) == (Decimal("0.25"), 0)
        assert book.refusals == 1

    def test_a_hand_back_frees_budget_but_a_dead_actors_lease_stays_counted(self) -> None:
        """An actor that hands back keeps only what it committed; one that died keeps its
        whole lease on the books (it may have paid up to it)."""
        book = BudgetBook(1.0, 1000)
        book.grow("a", Decimal("0.6"), 600)
        book.grow("b", Decimal("0.4"), 400)
        book.shrink("a", keep_usd=Decimal("0.1"), keep_tokens=100, spent_usd=Decimal("0.1"), spent_tokens=100)
        book.died("b")
        assert book.left() == (Decimal("0.5"), 500)
        assert book.snapshot()["dead_actors"] == 1

    def test_a_negative_cap_is_refused(self) -> None:
        """A cap below zero is a mistake, said so."""
        with pytest.raises(ConfigError, match="usd cap of -1"):
            BudgetBook(-1, None)


class TestLeasePool:
    async def test_blocks_grow_so_most_requests_need_no_round_trip(self) -> None:
        """100 requests through a pool fed by an in-process coordinator: the block size
        doubles while the stock keeps running dry, so round trips are a small share."""
        c = Coordinator("e", {"m": (6000, None)})
        pool = LeasePool(c.take, {("m", "requests"): c.largest("m", "requests") or 0}, ttl_s=2.0)
        for _ in range(100):
            await pool.take("m", 0)
        assert pool.round_trips < 20
        assert c.calls == pool.round_trips

    async def test_grants_lapse_after_their_lifetime_and_are_never_spent(self) -> None:
        """A grant not spent within its lifetime lapses: the next take asks again."""
        clock = ManualClock()
        c = Coordinator("e", {"m": (6000, None)}, clock=clock, sleep=clock.sleep)
        pool = LeasePool(c.take, {("m", "requests"): 100}, ttl_s=2.0, clock=clock)
        pool._stock[("m", "requests")].want = 50
        await pool.take("m", 0)
        assert pool.round_trips == 1
        clock.advance(2.5)
        await pool.take("m", 0)
        assert pool.round_trips == 2
        assert pool.lapsed()["requests"] == 49

    async def test_a_request_above_the_largest_grant_is_too_large(self) -> None:
        """Like a request above a local TPM limit: refused with the fix named."""
        c = Coordinator("e", {"m": (None, 600)})
        pool = LeasePool(c.take, {("m", "tokens"): c.largest("m", "tokens") or 0}, ttl_s=2.0)
        with pytest.raises(RequestTooLarge, match="lower max_tokens"):
            await pool.take("m", 11)

    async def test_the_leased_transport_returns_what_the_server_did_not_count(self) -> None:
        """The transport takes prompt bound + max_tokens, then gives back the difference to
        what the server reported (prompt + max_tokens), into the grant it came from."""
        c = Coordinator("e", {"m": (None, 60_000)})
        pool = LeasePool(c.take, {("m", "tokens"): c.largest("m", "tokens") or 0}, ttl_s=60.0)
        inner = ScriptedTransport(lambda r: Completion(text="42", usage=Usage(5, 1), model="m"))
        estimator = CharsPerTokenEstimator(chars_per_token=1.0)
        leased = LeasedTransport(inner, pool, estimator)
        req = request()
        reserved = estimator.prompt_tokens(req) + 16
        await leased.complete(req)
        # The first block is exactly this request's need; what the server did not count is back.
        assert pool.round_trips == 1
        assert pool._stock[("m", "tokens")].available(0.0) == reserved - (5 + 16)
        assert inner.requests == [req]


class TestJournalStore:
    async def test_a_query_rerun_elsewhere_replays_its_paid_calls_from_the_store(
        self, tmp_path: Path
    ) -> None:
        """Actor A journals a query's call and ships it; actor B, on another node with an
        empty journal, seeds that query's rows from the store and answers the same call
        without sending. Another query's identical call is not answered: rows are per query."""
        store = JournalStore(str(tmp_path / "store.sqlite"))
        sent: list[str] = []

        async def send() -> Completion:
            sent.append("x")
            return Completion(text="42", usage=Usage(5, 1), model="m")

        a = cast(ReplicatedJournal, await ReplicatedJournal.open(tmp_path / "a.sqlite"))
        token = CURRENT_QUERY.set("q1")
        try:
            assert (await a.call(request(), send))[1] is False
            shipped: list[list[StoreRow]] = []

            async def ship(rows: list[StoreRow]) -> int:
                shipped.append(rows)
                return store.put_many(rows)

            assert await a.flush(ship) == 1 and await a.flush(ship) == 0
        finally:
            CURRENT_QUERY.reset(token)
            await a.aclose()
        assert store.queries() == ["q1"] and store.count() == 1

        b = cast(ReplicatedJournal, await ReplicatedJournal.open(tmp_path / "b.sqlite"))
        try:
            token = CURRENT_QUERY.set("q1")
            await b.seed(store.rows_for("q1"))
            completion, from_journal = await b.call(request(), send)
            CURRENT_QUERY.reset(token)
            assert from_journal and completion.text == "42" and b.outbox() == []  # seeding ships nothing
            token = CURRENT_QUERY.set("q2")
            assert (await b.call(request(), send))[1] is False
            CURRENT_QUERY.reset(token)
        finally:
            await b.aclose()
        assert len(sent) == 2
        store.close()

    async def test_rows_that_fail_to_ship_are_kept_for_the_next_flush(self, tmp_path: Path) -> None:
        """A flush whose remote call fails keeps its rows: a paid call is never dropped
        from the outbox."""
        j = cast(ReplicatedJournal, await ReplicatedJournal.open(tmp_path / "a.sqlite"))
        try:
            await j.put("k", Completion(text="1", usage=Usage(1, 1), model="m"))

            async def broken(rows: list[StoreRow]) -> None:
                raise ConnectionError("store gone")

            with pytest.raises(ConnectionError):
                await j.flush(broken)
            assert len(j.outbox()) == 1
        finally:
            await j.aclose()


class TestProgressWithoutALedger:
    def test_dollars_come_from_the_rows_and_a_requeued_query_is_not_counted_twice(self) -> None:
        """The driver has no batch ledger: the display's dollars are the rows' (plus what
        kept rows spent) against the cap, and a query sent back to the queue when its actor
        died stops counting as running."""
        from rlm_async.batch import BatchItem, BatchProgress, BatchRow

        progress = BatchProgress(total=3, quiet=True)
        progress.rows_only(1.0, spent_before=0.25)
        item = BatchItem(id="a", query="q", context="c")
        progress.query_started(item)
        progress.query_requeued()
        progress.query_started(item)
        progress.row_done(BatchRow(id="a", line=1, status="ok", cost_usd=0.5, started_at=1.0))
        snap = progress.snapshot()
        assert (snap.spent_usd, snap.cap_usd, snap.running, snap.done) == (0.75, 1.0, 0, 1)


class TestRayFlagsOnTheCommandLine:
    def test_bad_ray_resources_and_actor_counts_are_refused_naming_the_fix(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`--ray-resources` that is not a JSON object of numbers, or `--ray-actors 0`, ends
        with exit code 2 and one line naming the flag, before any cluster is contacted."""
        from rlm_async.cli import main as cli_main

        source = tmp_path / "in.jsonl"
        source.write_text('{"id": "a", "query": "q", "context": "c"}\n', encoding="utf-8")
        config = Path(__file__).resolve().parent.parent / "configs" / "sim.toml"
        base = [
            "batch",
            str(source),
            "--out",
            str(tmp_path / "out.jsonl"),
            "--config",
            str(config),
            "--quiet",
        ]
        assert cli_main([*base, "--ray", "127.0.0.1:1", "--ray-resources", "[1, 2]"]) == 2
        assert "--ray-resources is not a JSON object" in capsys.readouterr().err
        assert cli_main([*base, "--ray", "127.0.0.1:1", "--ray-actors", "0"]) == 2
        assert "--ray-actors is 0; use at least 1" in capsys.readouterr().err
        assert not (tmp_path / "out.jsonl").exists()


class TestLocalToken:
    def test_a_local_ray_gets_a_private_token_that_is_gone_afterwards(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Inside the block Ray is pointed at a fresh token in a file only its owner can
        read, in a directory of its own; afterwards the file, the directory and every auth
        variable (RAY_AUTH_MODE included, which ray.init sets) are gone."""
        for name in AUTH_ENV:
            monkeypatch.delenv(name, raising=False)
        with local_token() as path:
            assert path is not None and os.environ["RAY_AUTH_TOKEN_PATH"] == str(path)
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
            assert len(path.read_text(encoding="ascii")) == 64
            assert Path.home() not in path.parents
            os.environ["RAY_AUTH_MODE"] = "token"  # what ray.init does for the processes it starts
        assert not path.parent.exists()
        assert [name for name in AUTH_ENV if name in os.environ] == []

    def test_auth_the_environment_configures_is_left_alone(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """RAY_AUTH_MODE (or a token) set by the user: no token is made, nothing changes."""
        for name in AUTH_ENV:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
        with local_token() as path:
            assert path is None and "RAY_AUTH_TOKEN_PATH" not in os.environ
        assert os.environ["RAY_AUTH_MODE"] == "disabled"
