"""The pool of pre-started REPL workers (`WorkerPool`, `RLMConfig.worker_pool`): each
worker is handed out once and killed after, never reused; pool and on-demand workers are
confined alike; start failures surface at once; nothing is left running after shutdown.

Observed from outside: worker pids and uids (events, `/proc`), what a worker's own code
reports about its limits, the simulator's request log. No wall-clock assertion."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from typing import Any

import anyio
import pytest
from conftest import EventLog, open_sim, rlm_config, sim_config
from test_sandbox_support import ISOLATING_TIERS, assert_nothing_left, config

from rlm_async._events import WorkerSlotWait, WorkerStart
from rlm_async._rlm import RLM
from rlm_async.exceptions import ConfigError, ContextTypeError, IsolationUnavailable, SandboxError
from rlm_async.sandbox import ReplSetup, WorkerPool, WorkerRequest, start_worker
from rlm_async.sandbox import _procs as procs
from rlm_async.testing import capture_events
from rlm_async.workloads import oolong_counting

pytestmark = pytest.mark.anyio

# What a worker's own code says about how it is confined (the uid aside: each has its own).
CONFINEMENT = """
import os, resource
limits = [resource.getrlimit(r) for r in (resource.RLIMIT_AS, resource.RLIMIT_CPU,
          resource.RLIMIT_FSIZE, resource.RLIMIT_NOFILE, resource.RLIMIT_NPROC, resource.RLIMIT_CORE)]
print(limits, os.getuid() == 0, os.getpid(), sorted(os.listdir('/proc'))[:3] if os.path.isdir('/proc') else None,
      os.path.exists('/root'), sorted(os.environ))
"""


async def no_requests(request: WorkerRequest) -> list[str]:
    raise AssertionError(f"unexpected sub-call {request}")


async def idle_pids(pool: WorkerPool) -> list[int]:
    return [p.pid for p in pool._idle]


class TestHandingOut:
    async def test_each_worker_is_a_distinct_prestarted_process_used_once(self) -> None:
        """Six workers taken from a pool of three: six distinct pids, each loaded with its own
        context, the first three pre-started; a worker closed is dead and never handed out again."""
        seen: list[int] = []
        async with WorkerPool(config(), size=3) as pool:
            await pool.wait_full()
            prestarted = set(await idle_pids(pool))
            with capture_events() as events:
                for i in range(6):
                    worker = await pool.start_worker(f"context number {i}")
                    result = await worker.run_cell("print(context)", no_requests)
                    assert result.stdout.strip() == f"context number {i}"
                    assert worker.pid not in seen
                    seen.append(worker.pid)
                    await worker.aclose()
                    assert not worker.alive
                    await assert_nothing_left(worker.pid, worker.uid)
            starts = events.of(WorkerStart)
            assert [e.pid for e in starts] == seen
            assert {e.pid for e in starts if e.pooled} >= prestarted & set(seen)
            assert set(seen[:3]) == prestarted  # the first three came from the pool
            assert not set(await idle_pids(pool)) & set(seen)
            stats = pool.stats()
            assert stats.taken + stats.misses == 6 and stats.taken >= 3

    async def test_concurrent_takers_never_share_a_worker(self) -> None:
        """Ten tasks take at once from a pool of four: ten distinct pids and ten distinct
        private uids (as root), each worker seeing only its own context."""
        got: dict[int, tuple[int, int | None, str]] = {}
        async with WorkerPool(config(), size=4) as pool:
            await pool.wait_full()

            async def take(i: int) -> None:
                worker = await pool.start_worker(f"ctx-{i}")
                try:
                    out = await worker.run_cell("print(context)", no_requests)
                    got[i] = (worker.pid, worker.uid, out.stdout.strip())
                finally:
                    await worker.aclose()

            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(take, i)
        assert [got[i][2] for i in range(10)] == [f"ctx-{i}" for i in range(10)]
        assert len({pid for pid, _, _ in got.values()}) == 10
        uids = [uid for _, uid, _ in got.values() if uid is not None]
        assert len(set(uids)) == len(uids)
        if os.geteuid() == 0:
            assert len(uids) == 10

    async def test_a_pooled_worker_is_confined_like_one_started_on_demand(self) -> None:
        """The same code reports the same limits, uid class, /proc view and environment in a
        pooled worker and in one started on demand, under the same tier."""
        cfg = config(memory_bytes=1 << 30, cpu_seconds=120, open_files=128, max_processes=32)
        async with WorkerPool(cfg, size=1) as pool:
            await pool.wait_full()
            pooled = await pool.start_worker("c")
            try:
                fresh = await start_worker("c", cfg)
                try:
                    a = await pooled.run_cell(CONFINEMENT, no_requests)
                    b = await fresh.run_cell(CONFINEMENT, no_requests)
                finally:
                    await fresh.aclose()
            finally:
                await pooled.aclose()
        assert a.status == b.status == "ok", (a.error, b.error)
        assert pooled.tier == fresh.tier
        assert (pooled.uid is None) == (fresh.uid is None)
        assert a.stdout == b.stdout  # limits, root or not, worker pid inside, /proc, home, env

    async def test_a_pooled_worker_gets_its_setup_with_its_context(self) -> None:
        """A worker pre-started with no context gets a `ReplSetup`'s values, tools and
        variable listing with its context, as one started on demand with the same setup."""
        setup = ReplSetup(
            tools=(("lookup", "Look a key up."),), values_json='{"k": [1, 2]}', list_variables=True
        )
        code = "print(context, k, callable(lookup), lookup.__doc__)\nmine = 3"
        async with WorkerPool(config(), size=1) as pool:
            await pool.wait_full()
            pooled = await pool.start_worker("c", setup)
            try:
                assert pool.stats().taken == 1
                fresh = await start_worker("c", config(), setup)
                try:
                    a = await pooled.run_cell(code, no_requests)
                    b = await fresh.run_cell(code, no_requests)
                finally:
                    await fresh.aclose()
            finally:
                await pooled.aclose()
        assert a.status == b.status == "ok", (a.error, b.error)
        assert a.stdout.strip() == "c [1, 2] True Look a key up."
        assert (a.stdout, a.variables) == (b.stdout, b.variables)
        assert a.variables is not None and "mine" in a.variables

    async def test_a_worker_that_died_while_idle_is_skipped(self) -> None:
        """An idle worker killed from outside is not handed out: the taker gets a live one
        with its context, and the pool counts one discarded."""
        async with WorkerPool(config(), size=2) as pool:
            await pool.wait_full()
            victim = pool._idle[0]
            os.killpg(victim.pid, signal.SIGKILL)
            await victim.wait()
            worker = await pool.start_worker("alive")
            try:
                assert worker.pid != victim.pid
                out = await worker.run_cell("print(context)", no_requests)
                assert out.stdout.strip() == "alive"
            finally:
                await worker.aclose()
            assert pool.stats().discarded == 1

    async def test_a_context_json_cannot_carry_costs_no_idle_worker(self) -> None:
        """A context that is not JSON-serialisable is refused before a pooled worker is
        touched: the same idle workers are still there."""
        async with WorkerPool(config(), size=2) as pool:
            await pool.wait_full()
            before = await idle_pids(pool)
            with pytest.raises(ContextTypeError):
                await pool.start_worker([{"x": object()}])  # type: ignore[list-item]
            assert await idle_pids(pool) == before


class TestRefill:
    async def test_refills_wait_while_the_event_loop_is_busy(self) -> None:
        """While every turn of the event loop looks slow (an injected clock), the pool does
        not refill a taken worker; once turns are quick again, it does."""
        busy = [True]
        ticks = [0.0]

        def clock() -> float:
            ticks[0] += 0.010 if busy[0] else 0.0001  # each reading: one turn's length
            return ticks[0]

        rechecks = [0]

        async def sleep(seconds: float) -> None:
            rechecks[0] += 1
            await anyio.sleep(0.001)

        async with WorkerPool(config(), size=1, clock=clock, sleep=sleep) as pool:
            worker = await pool.start_worker("x")
            await worker.aclose()
            for _ in range(200):
                if rechecks[0] >= 20:
                    break
                await anyio.sleep(0.005)
            assert rechecks[0] >= 20 and pool.stats().idle == 0 and pool.stats().prestarted == 0
            busy[0] = False
            with anyio.fail_after(60):
                await pool.wait_full()
            assert pool.stats().prestarted == 1

    async def test_refills_wait_for_an_idle_core_while_handed_out_workers_run(self) -> None:
        """While a worker the pool handed out still runs and the machine's cores are all
        busy (injected idle-CPU readings), the pool does not refill; with a core idle again,
        or once nothing handed out runs, it does."""
        idle = [0.0]
        busy = [True]
        reads = [0]

        def cpu_idle() -> float:
            reads[0] += 1
            idle[0] += 0.0 if busy[0] else 1.0  # idle seconds gained between two reads
            return idle[0]

        async with WorkerPool(config(), size=1, cpu_idle=cpu_idle) as pool:
            worker = await pool.start_worker("x")
            assert pool.in_use() == 1
            try:
                with anyio.move_on_after(1.0):
                    await pool.wait_full()
                assert reads[0] >= 5 and pool.stats().prestarted == 0, (reads, pool.stats(), pool.in_use())
                busy[0] = False
                with anyio.fail_after(60):
                    await pool.wait_full()
                assert pool.stats().prestarted == 1 and pool.in_use() == 1
                # Busy again, and the idle worker taken: once the taken one is closed,
                # nothing handed out runs and the pool refills whatever the cores do.
                busy[0] = True
                second = await pool.start_worker("y")
                await second.aclose()
            finally:
                await worker.aclose()
            assert pool.in_use() == 0
            with anyio.fail_after(60):
                await pool.wait_full()
            assert pool.stats().prestarted == 2

    async def test_while_queries_run_the_pool_refills_only_its_reserve(self) -> None:
        """A pool of 12 (its reserve: 1) with its cores idle throughout (injected readings):
        one worker taken leaves 11 up, and nothing is refilled while it runs; all taken,
        one is refilled (the reserve) and no more while they run; once every worker handed
        out has ended, the pool fills to 12."""
        idle = [0.0]

        def cpu_idle() -> float:
            idle[0] += 2.0  # both cores idle between any two reads
            return idle[0]

        async with WorkerPool(config(), size=12, cpu_idle=cpu_idle) as pool:
            assert pool.reserve == 1
            with anyio.fail_after(120):
                await pool.wait_full()
            first = await pool.start_worker("x")
            await anyio.sleep(0.5)  # ten looks at the cores, all idle
            # (`prestarted` counts refills: not the first worker, which entering started.)
            assert pool.stats().idle == 11 and pool.stats().prestarted == 11, pool.stats()
            rest = [await pool.start_worker("x") for _ in range(11)]
            for _ in range(1200):  # up to a minute for the reserve's pre-start
                if pool.stats().idle:
                    break
                await anyio.sleep(0.05)
            await anyio.sleep(0.5)
            assert pool.stats().idle == 1 and pool.stats().starting == 0, pool.stats()
            assert pool.stats().prestarted == 12
            for worker in (first, *rest):
                await worker.aclose()
            with anyio.fail_after(120):
                await pool.wait_full()
            assert pool.stats().prestarted == 23 and pool.stats().misses == 0


class TestLifeCycle:
    async def test_nothing_is_left_after_shutdown(self) -> None:
        """Leaving the pool kills every idle worker and every start in flight: a /proc scan
        finds none of their processes, by group or by private uid."""
        async with WorkerPool(config(), size=4) as pool:
            await pool.wait_full()
            idle = [(p.pid, p.uid) for p in pool._idle]
            taken = await pool.start_worker("x")  # one taken: a refill is now in flight
            await taken.aclose()
        assert len(idle) == 4
        for pid, uid in idle:
            await assert_nothing_left(pid, uid)
        assert pool.stats().idle == 0

    async def test_cancelled_while_filling_leaves_nothing(self) -> None:
        """A pool left by cancellation while its fillers are mid-start leaves no process:
        no child of this process is left running, nor any process of the workers seen."""
        seen: list[tuple[int, int | None]] = []
        with anyio.CancelScope() as scope:
            async with WorkerPool(config(), size=6) as pool:
                seen.extend((p.pid, p.uid) for p in pool._idle)
                for _ in range(60_000):  # until a filler is mid-start
                    if pool.stats().starting:
                        break
                    await anyio.sleep(0.001)
                assert pool.stats().starting
                scope.cancel()
                await anyio.sleep(30)
        assert scope.cancelled_caught and seen
        for pid, uid in seen:
            await assert_nothing_left(pid, uid)
        mine = [p for p in procs.scan() if p.ppid == os.getpid() and p.state not in ("Z", "X")]
        assert mine == []

    @pytest.mark.parametrize("tier", ISOLATING_TIERS)
    async def test_an_engine_killed_outright_leaves_no_idle_worker(self, tier: str) -> None:
        """An engine process holding a full pool is SIGKILLed (no clean-up runs): its idle
        workers go too (bubblewrap dies with its parent; a waiting worker of any tier exits
        when its control socket closes), so no process of theirs is left."""
        script = (
            "import anyio, json, sys\n"
            "from rlm_async.sandbox import SandboxConfig, WorkerPool\n"
            "async def main():\n"
            f"    async with WorkerPool(SandboxConfig(isolation={tier!r}, start_timeout_s=60), size=2) as pool:\n"
            "        await pool.wait_full()\n"
            "        print(json.dumps([[p.pid, p.uid] for p in pool._idle]), flush=True)\n"
            "        await anyio.sleep(600)\n"
            "anyio.run(main)\n"
        )
        proc = await anyio.open_process([sys.executable, "-c", script], start_new_session=True)
        try:
            assert proc.stdout is not None
            with anyio.fail_after(120):
                line = b""
                async for chunk in proc.stdout:
                    line += chunk
                    if b"\n" in line:
                        break
            idle = json.loads(line)
            assert len(idle) == 2
            for pid, _ in idle:
                assert procs._read_proc(pid) is not None  # up before the kill
        finally:
            proc.kill()
            await proc.wait()
        for pid, uid in idle:
            await assert_nothing_left(pid, uid)

    async def test_a_pool_that_cannot_start_says_why_at_once(self) -> None:
        """No usable tier: entering raises IsolationUnavailable naming the fix. A tier that
        plans but whose workers cannot come up: SandboxError saying the pool could not pre-start."""
        with pytest.raises(IsolationUnavailable, match="Fix:"):
            async with WorkerPool(config(isolation="bubblewrap", bwrap_path="/nonexistent/bwrap"), size=2):
                pass
        with pytest.raises(SandboxError, match=r"worker pool could not pre-start.*start_timeout_s"):
            async with WorkerPool(config(start_timeout_s=1e-6), size=2):
                pass

    async def test_an_unexpected_refill_error_backs_off_and_the_pool_goes_on(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A refill that fails with something other than a SandboxError (here the process
        running out of descriptors) is counted and named, and the pool backs off and fills
        again: it does not end the engine or service it runs in."""
        from rlm_async.sandbox import _pool, _process

        real = _process.launch_process
        calls = [0]

        async def flaky(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 2:  # the first refill after the pre-start on entry
                raise OSError(24, "Too many open files")
            return await real(*args, **kwargs)

        monkeypatch.setattr(_pool, "launch_process", flaky)
        async with WorkerPool(config(), size=2, sleep=lambda s: anyio.sleep(0.01)) as pool:
            with anyio.fail_after(60):
                await pool.wait_full()
            stats = pool.stats()
            assert stats.failures == 1 and stats.idle == 2
            assert stats.last_error is not None and "OSError" in stats.last_error
            worker = await pool.start_worker("ok")
            assert (await worker.run_cell("print(context)", no_requests)).stdout == "ok\n"
            await worker.aclose()

    async def test_bad_sizes_are_refused(self) -> None:
        """A pool of zero or a negative size is a ConfigError naming the value; so is a
        negative RLMConfig.worker_pool."""
        with pytest.raises(ConfigError, match="positive int, not 0"):
            WorkerPool(config(), size=0)
        with pytest.raises(ConfigError, match="worker_pool must be an int >= 0"):
            rlm_config(worker_pool=-1)

    async def test_taking_from_a_closed_pool_is_refused(self) -> None:
        """After the pool is left, start_worker says the pool is not open."""
        async with WorkerPool(config(), size=1) as pool:
            pass
        with pytest.raises(SandboxError, match="not open"):
            await pool.start_worker("x")


@pytest.mark.e2e
class TestEngineUsesThePool:
    async def test_queries_over_http_take_pooled_workers_never_reused(self) -> None:
        """Eight concurrent COUNT queries on one RLM with worker_pool=4, on the simulator over
        HTTP: all right, eight distinct worker pids, the first four pre-started, every
        worker.start says whether it was pooled, and no worker process is left after."""
        async with open_sim() as sim:
            cfg = sim_config(sim, worker_pool=4, sandbox=config())
            tasks = [oolong_counting(4_000, seed=i) for i in range(8)]
            events = EventLog()
            results: list[Any] = [None] * 8
            async with RLM(config=cfg, event_sinks=[events]) as rlm:
                pool = rlm.worker_pool
                assert pool is not None
                await pool.wait_full()
                prestarted = set(await idle_pids(pool))

                async def one(i: int) -> None:
                    results[i] = await rlm.acompletion(tasks[i].context, tasks[i].query)

                async with anyio.create_task_group() as tg:
                    for i in range(8):
                        tg.start_soon(one, i)
                idle_after = [(p.pid, p.uid) for p in pool._idle]
            assert all(t.score(r.response or "") for t, r in zip(tasks, results, strict=True))
            starts = events.of(WorkerStart)
            pids = [e.pid for e in starts]
            assert len(pids) == len(set(pids)) == 8
            assert prestarted <= set(pids)
            assert {e.pid for e in starts if e.pooled} >= prestarted
            assert len(events.of(WorkerSlotWait)) == 8
            for e in starts:
                await assert_nothing_left(e.pid, e.uid)
            for pid, uid in idle_after:
                await assert_nothing_left(pid, uid)

    async def test_a_per_request_sandbox_other_than_the_pools_starts_on_demand(self) -> None:
        """An engine whose sandbox config differs from the pool's never takes a pooled
        worker: its worker.start says pooled=False, and the pool's idle workers are untouched."""
        async with open_sim() as sim:
            cfg = sim_config(sim, worker_pool=1, sandbox=config())
            events = EventLog()
            async with RLM(config=cfg, event_sinks=[events]) as rlm:
                pool = rlm.worker_pool
                assert pool is not None
                await pool.wait_full()
                before = await idle_pids(pool)
                other = dataclasses.replace(cfg, sandbox=config(cpu_seconds=77))
                engine = (await rlm._engine()).with_config(other)
                task = oolong_counting(2_000, seed=3)
                result = await engine.run(task.context, task.query, sinks=(events,))
                assert task.score(result.response or "")
                assert await idle_pids(pool) == before
            assert [e.pooled for e in events.of(WorkerStart)] == [False]

    async def test_without_async_with_workers_start_on_demand(self) -> None:
        """worker_pool > 0 but no `async with`: no pool runs; the query's worker starts on
        demand (worker.start says pooled=False) and nothing is left afterwards."""
        async with open_sim() as sim:
            cfg = sim_config(sim, worker_pool=2, sandbox=config())
            events = EventLog()
            rlm = RLM(config=cfg, event_sinks=[events])
            try:
                assert rlm.worker_pool is None
                task = oolong_counting(2_000, seed=5)
                result = await rlm.acompletion(task.context, task.query)
            finally:
                await rlm.aclose()
            assert task.score(result.response or "")
            assert [e.pooled for e in events.of(WorkerStart)] == [False]
