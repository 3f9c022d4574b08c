"""A worker's top process, started by `subprocess.Popen` and waited for on a pidfd: exit
codes and signals, several waiters, its own session, no waiting thread, on asyncio and on
uvloop; and the event loop's API where pidfds are refused."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import anyio
import pytest
from conftest import BOTH_LOOPS

from rlm_async.sandbox import _child
from rlm_async.sandbox._child import PidfdChild, start_child

needs_pidfd = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no pidfds here (Linux 5.3+ only)")


@pytest.fixture(params=BOTH_LOOPS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param  # type: ignore[no-any-return]


async def run(code: str, *, pass_fds: tuple[int, ...] = ()) -> _child.ChildProcess:
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        return await start_child(
            [sys.executable, "-c", code], stdout=null, stderr=null, env={}, cwd="/", pass_fds=pass_fds
        )
    finally:
        os.close(null)


@needs_pidfd
class TestPidfdChild:
    @pytest.mark.anyio
    async def test_exit_status_and_signal_are_reported(self) -> None:
        """A child that exits 3 reports 3, from `wait()` and `returncode`; one killed by
        SIGKILL reports -9; `returncode` is None while it runs."""
        exits = await run("raise SystemExit(3)")
        assert isinstance(exits, PidfdChild)
        assert await exits.wait() == 3 and exits.returncode == 3
        sleeper = await run("import time; time.sleep(60)")
        assert sleeper.returncode is None
        os.kill(sleeper.pid, signal.SIGKILL)
        assert await sleeper.wait() == -signal.SIGKILL

    @pytest.mark.anyio
    async def test_several_tasks_wait_for_one_child(self) -> None:
        """Three tasks waiting at once each get the status (one reads the pidfd at a time)."""
        child = await run("import time; time.sleep(0.2); raise SystemExit(7)")
        got: list[int] = []

        async def waiter() -> None:
            got.append(await child.wait())

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(waiter)
        assert got == [7, 7, 7]

    @pytest.mark.anyio
    async def test_its_own_session_and_only_the_descriptors_passed(self) -> None:
        """The child leads a session of its own and inherits the descriptor passed, not
        another one the engine holds open."""
        passed_r, passed_w = os.pipe()
        kept_r, kept_w = os.pipe()
        try:
            code = (
                "import os, sys\n"
                f"os.fstat({passed_w})\n"
                f"try:\n    os.fstat({kept_w})\nexcept OSError:\n    sys.exit(0 if os.getsid(0) == os.getpid() else 2)\n"
                "sys.exit(1)"
            )
            child = await run(code, pass_fds=(passed_w,))
            assert await child.wait() == 0
        finally:
            for fd in (passed_r, passed_w, kept_r, kept_w):
                os.close(fd)

    @pytest.mark.anyio
    async def test_no_thread_waits_for_it(self) -> None:
        """While a child runs, no thread is waiting for it (asyncio's child watcher starts
        one per child); the loop hears of the exit through the pidfd."""
        before = threading.active_count()
        child = await run("import time; time.sleep(0.3)")
        during = threading.active_count()
        assert await child.wait() == 0
        assert during == before


class TestWithoutPidfds:
    @pytest.mark.anyio
    async def test_the_event_loops_api_where_pidfds_are_refused(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Where this process may not open pidfds, the child is the event loop's process
        (anyio's), with the same exit status."""
        monkeypatch.setattr(_child, "_pidfds_work", lambda: False)
        child = await run("raise SystemExit(5)")
        assert not isinstance(child, PidfdChild)
        assert await child.wait() == 5
