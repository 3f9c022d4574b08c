"""Workers that share the engine's uid, as a normal user runs them (landlock or none tier,
engine not root): RLIMIT_NPROC then counts every process and thread of the user, so each
worker's limit must leave room for the other workers alive at the same time.

The bug these pin down: as a normal user, 48 concurrent queries with max_workers 32 (the
budget fuzz) lost about 16 root workers at start, "the worker closed its control channel
(exit status 1)" with nothing more: each worker was allowed 64 tasks more than the count
its start saw, the workers starting together used that up between them, and the next
one's control thread could not start; its traceback went to the cell's stderr buffer, not
the engine. As root every worker gets a private uid and these tests check that path
instead; `.ci/unprivileged` runs this file again as a created user, where the shared uid
is what is under test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import textwrap
from typing import Any

import anyio
import pytest
from conftest import EventLog, sim_config
from test_sandbox_support import assert_nothing_left, config, needs_landlock

from rlm_async import RLM
from rlm_async._events import WorkerStart
from rlm_async.sandbox import Worker, WorkerPool, WorkerRequest, start_worker
from rlm_async.sandbox import _bootstrap as proto
from rlm_async.sandbox import _launch as launch
from rlm_async.sandbox import _procs as procs
from rlm_async.sim import Policies, PolicySpec, SimConfig, SimServer

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

SHARED_UID_TIERS = [pytest.param("landlock", marks=needs_landlock), "none"]
"""The tiers in which an unprivileged engine's workers keep its uid (bubblewrap's user
namespace gives each worker a count of its own)."""

THREADS = 4
THREADED_CELL = textwrap.dedent(
    f"""
    import threading
    got = []
    threads = [threading.Thread(target=lambda i=i: got.append(llm_query(f"part {{i}}")))
               for i in range({THREADS})]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(len(got))
    """
)
"""Honest code: a few threads, each making a sub-call (the paper's REPL examples do this)."""


async def echo(request: WorkerRequest) -> list[str]:
    return ["echo:" + p for p in request.prompts]


class TestManyWorkersOnOneUid:
    @pytest.mark.parametrize("tier", SHARED_UID_TIERS)
    async def test_workers_started_together_all_start_and_can_start_threads(self, tier: str) -> None:
        """40 workers started at once (no `peers` given) all come up, and then each runs a
        cell that starts threads: no worker's process cap was used up by the others."""
        count = 40
        workers: list[Worker] = []
        cfg = config(isolation=tier, max_processes=16)

        async def start_one() -> None:
            workers.append(await start_worker("", cfg))

        try:
            async with anyio.create_task_group() as tg:
                for _ in range(count):
                    tg.start_soon(start_one)
            assert len(workers) == count
            outputs: list[str] = []

            async def run(worker: Worker) -> None:
                result = await worker.run_cell(THREADED_CELL, echo)
                outputs.append(f"{result.status} {result.stdout.strip()} {result.stderr.strip()[-300:]}")

            async with anyio.create_task_group() as tg:
                for worker in workers:
                    tg.start_soon(run, worker)
            assert outputs == [f"ok {THREADS} "] * count, outputs
        finally:
            with anyio.CancelScope(shield=True):
                for worker in workers:
                    await worker.aclose()
        for worker in workers:
            await assert_nothing_left(worker.pid, worker.uid)


class TestPooledWorkers:
    @pytest.mark.parametrize("tier", SHARED_UID_TIERS)
    async def test_a_pooled_worker_gets_the_same_process_cap_as_one_started_on_demand(
        self, tier: str
    ) -> None:
        """A worker pre-started by a pool with `peers` has its RLIMIT_NPROC sized when its
        context arrives, by the same rule as an on-demand worker: `max_processes` for its
        own uid (root), or room for `max_processes` per peer on the shared uid; and it can
        start threads."""
        peers, cap = 10, 16
        cfg = config(isolation=tier, max_processes=cap)
        code = "import resource\nprint(resource.getrlimit(resource.RLIMIT_NPROC)[0])\n" + THREADED_CELL
        async with WorkerPool(cfg, size=1, peers=peers) as pool:
            await pool.wait_full()
            worker = await pool.start_worker("")
            try:
                assert pool.stats().taken == 1
                result = await worker.run_cell(code, echo)
            finally:
                await worker.aclose()
        assert result.status == "ok", (result.error, result.stderr)
        nproc, threads = result.stdout.split()
        assert threads == str(THREADS)
        if worker.uid is not None:
            assert int(nproc) == cap
        elif os.geteuid() != 0:
            assert int(nproc) >= cap * peers
        await assert_nothing_left(worker.pid, worker.uid)


class TestQueriesWaitingForWorkerSlots:
    @pytest.mark.parametrize("tier", SHARED_UID_TIERS)
    async def test_every_query_gets_a_worker_when_more_queries_than_slots_run(self, tier: str) -> None:
        """48 concurrent queries over real HTTP with max_workers=16: every root worker
        starts (also those that waited for a slot), each root's cell makes its sub-calls
        from threads, and the server sees every one of them; no worker process is left."""
        queries, slots = 48, 16
        code = f"```repl\n{THREADED_CELL}answer['content'] = str(len(got))\nanswer['ready'] = True\n```"
        policies = Policies(root=PolicySpec(name="script", options={"replies": [code]}))
        events = EventLog()
        results: list[Any] = []
        async with SimServer(SimConfig(policies=policies)) as sim:
            cfg = sim_config(sim, sandbox=config(isolation=tier), max_workers=slots)

            async def one(i: int) -> None:
                async with RLM(config=cfg, event_sinks=[events]) as rlm:
                    results.append(await rlm.acompletion(f"context {i}", f"query {i}"))

            async with anyio.create_task_group() as tg:
                for i in range(queries):
                    tg.start_soon(one, i)
            log = list(sim.log)
        assert [(r.status, r.response) for r in results] == [("ok", str(THREADS))] * queries, [
            r.detail for r in results if r.status != "ok"
        ]
        served = [(e.kind, e.status) for e in log]
        assert served.count(("root", 200)) == queries
        assert served.count(("sub", 200)) == queries * THREADS
        assert len(served) == queries * (1 + THREADS)
        starts = events.of(WorkerStart)
        assert len(starts) == queries and {e.tier for e in starts} == {tier}
        for start in starts:
            await assert_nothing_left(start.pid, start.uid)


class TestAStartFailureSaysWhy:
    def test_a_worker_that_cannot_start_its_control_thread_names_the_process_limit(self) -> None:
        """A worker whose RLIMIT_NPROC leaves no room for its control thread exits 1 and says
        so on stderr (which the engine quotes in its error), instead of a traceback lost in
        the cell's output buffer. As root the worker switches to a fresh private uid first
        (the limit does not bind root), so the count it hits is its own."""
        interp = anyio.run(launch.find_interpreter, None)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        uid = procs.pick_free_uid() if os.geteuid() == 0 else None
        init = {
            "op": "init",
            "version": proto.PROTOCOL_VERSION,
            "context_type": "str",
            "limits": {"nproc": 1},
            "uid": uid,
            "tier": "none",
            "lockdown": None,
            "output_limit": 1000,
            "max_message": 1 << 20,
        }
        with parent, child:
            proc = subprocess.Popen(
                launch.plain_argv(interp, child.fileno()),
                pass_fds=[child.fileno()],
                env={},
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            child.close()
            parent.sendall(proto.encode_frame(init, 0))
            _, err = proc.communicate(timeout=60)
            received = b""
            while chunk := parent.recv(1 << 16):
                received += chunk
        # Its `hello` (protocol 2: sent before the context), then no "ready": the channel closed.
        assert _ops(received) == ["hello"], received
        text = err.decode("utf-8", "replace")
        assert proc.returncode == 1, text
        assert "cannot start its control thread" in text and "RLIMIT_NPROC is 1" in text, text


def _ops(data: bytes) -> list[str]:
    """The `op` of each whole frame in `data`."""
    ops = []
    while len(data) >= proto.HEADER.size:
        json_len, blob_len = proto.HEADER.unpack_from(data)
        end = proto.HEADER.size + json_len
        ops.append(json.loads(data[proto.HEADER.size : end])["op"])
        data = data[end + blob_len :]
    return ops
