"""Killing a bubblewrap worker through its pid namespace: every process it started is gone
when `aclose()` returns (no polling), and no kill reads the host's process table. Before,
each kill scanned every process on the host (about 1 s of CPU per 180 workers killed at
once: a burst of queries ending, a pool's shutdown); the other tiers still scan, and so
does a bubblewrap kill that comes before bwrap said which process is its namespace's init."""

from __future__ import annotations

import textwrap

import anyio
import pytest
from conftest import descriptors_above_1023
from test_sandbox_support import config, needs_bwrap, needs_root

from rlm_async.sandbox import WorkerPool, WorkerRequest, start_worker
from rlm_async.sandbox import _procs as procs

pytestmark = [pytest.mark.anyio, needs_bwrap]

_ESCAPERS = textwrap.dedent(
    """
    import ctypes, os, subprocess, sys, time
    # A child that ignores SIGTERM, and a double-forked, setsid'd grandchild that first
    # cleared the child-subreaper flag: out of the worker's group and tree.
    subprocess.Popen([sys.executable, '-c',
        'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)'])
    ctypes.CDLL(None).prctl(36, 0, 0, 0, 0)
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.write(w, b"up")
            time.sleep(300)
        os._exit(0)
    print(os.read(r, 2).decode())
    """
)


async def refuse(request: WorkerRequest) -> list[str]:
    raise AssertionError(f"unexpected sub-call {request}")


def _running(uid: int) -> list[procs.Proc]:
    return [p for p in procs._scan_now() if p.uid == uid and p.state not in ("Z", "X")]


class TestNamespaceKill:
    @needs_root
    async def test_nothing_of_the_worker_runs_once_aclose_returns(self) -> None:
        """A worker whose code left a SIGTERM-proof child and an escaped grandchild: right
        after `aclose()` no process of its private uid runs, with no wait or retry."""
        worker = await start_worker("", config(isolation="bubblewrap"))
        try:
            assert worker.uid is not None
            result = await worker.run_cell(_ESCAPERS, refuse)
            assert result.stdout.strip() == "up", result
            assert len(_running(worker.uid)) >= 3  # the interpreter, the child, the grandchild
        finally:
            await worker.aclose()
        assert _running(worker.uid) == []

    async def test_kills_read_no_process_table(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Eight workers taken from a pool and killed at once: not one scan of `/proc`."""
        scans = 0
        real = procs._scan_now

        def counted() -> list[procs.Proc]:
            nonlocal scans
            scans += 1
            return real()

        monkeypatch.setattr(procs, "_scan_now", counted)
        async with WorkerPool(config(isolation="bubblewrap"), size=8) as pool:
            await pool.wait_full()
            taken = [await pool.start_worker(f"context {i}") for i in range(8)]
            for worker in taken:
                assert (await worker.run_cell("print(len(context))", refuse)).stdout == "9\n"
            before = scans
            async with anyio.create_task_group() as tg:
                for worker in taken:
                    tg.start_soon(worker.aclose)
            assert scans == before
            assert not any(w.alive for w in taken) and pool.in_use() == 0


class TestManyDescriptors:
    async def test_a_worker_started_and_killed_above_descriptor_1023(self) -> None:
        """With over a thousand descriptors open (a server with a hundred queries holds
        thousands), a worker's pidfds are numbered above select()'s limit of 1,023: it
        still starts, runs and is killed through its namespace, and nothing of it runs."""
        with descriptors_above_1023():
            worker = await start_worker("abc", config(isolation="bubblewrap"))
            try:
                assert (await worker.run_cell("print(len(context))", refuse)).stdout == "3\n"
            finally:
                await worker.aclose()
            assert not worker.alive
            if worker.uid is not None:  # a private uid (as root): nothing of it runs
                assert _running(worker.uid) == []


class TestGroupOf:
    def test_a_reaped_leaders_number_held_by_a_stranger_is_not_killed_as_a_group(self) -> None:
        """A worker's group is killed by its leader's number, but once the leader is reaped
        and the number is seen on another live process (pid reuse), the group is left out:
        that process may lead a group of its own, such as another worker's."""
        import subprocess
        import sys

        stranger = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True
        )
        try:
            assert procs.group_of(stranger.pid, reaped=False) == stranger.pid
            assert procs.group_of(stranger.pid, reaped=True) is None
        finally:
            stranger.kill()
            stranger.wait()
        # Gone: no stranger holds the number, so a group by it can only be the worker's.
        assert procs.group_of(stranger.pid, reaped=True) == stranger.pid
