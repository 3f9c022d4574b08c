"""A worker ended by a signal as it is launched is launched once more; the sandbox's probes
run out of the engine's process group.

A signal sent to the engine's process group (a terminal's Ctrl-C, a process manager's
SIGTERM to the group) can reach a worker only in the instant between its fork and its
`setsid`: it stays pending in the child and kills it as soon as the child resets its
handlers. A batch's first Ctrl-C should let running queries finish, and one of them lost
its worker that way (an `error` row). Here the same signal is sent to a real worker process
right after its launch, at the seam where the race would land it.

The workers here run in the "none" tier, whose interpreter dies of the signal whenever it
comes. bubblewrap's monitor blocks signals once it runs, so a signal sent after its launch
may find it immune; the race itself lands before the exec, the same in every tier."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from test_sandbox_support import config

from rlm_async._events import WorkerStart
from rlm_async.exceptions import SandboxError
from rlm_async.sandbox import WorkerRequest, _worker, start_worker
from rlm_async.sandbox._launch import run_probe
from rlm_async.sandbox._process import WorkerProcess, launch_process
from rlm_async.testing import capture_events

pytestmark = pytest.mark.anyio


async def no_requests(request: WorkerRequest) -> list[str]:
    raise AssertionError("no sub-calls expected")


def signal_the_first(monkeypatch: pytest.MonkeyPatch, sig: signal.Signals, times: int) -> list[int]:
    """Launch workers for real, sending `sig` to the first `times` of them as soon as they
    are launched; returns the pids launched, in order."""
    launched: list[int] = []

    async def launch(*args: Any, **kwargs: Any) -> WorkerProcess:
        process = await launch_process(*args, **kwargs)
        launched.append(process.pid)
        if len(launched) <= times:
            os.kill(process.pid, sig)
        return process

    monkeypatch.setattr(_worker, "launch_process", launch)
    return launched


class TestStartEndedBySignal:
    @pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
    async def test_the_worker_is_launched_again_and_runs(
        self, monkeypatch: pytest.MonkeyPatch, sig: signal.Signals
    ) -> None:
        """The first launch dies of the signal; a second one is made, the worker runs the
        cell with its context, and one worker reports started."""
        launched = signal_the_first(monkeypatch, sig, times=1)
        with capture_events(WorkerStart) as started:
            worker = await start_worker("the context", config(isolation="none"))
            try:
                result = await worker.run_cell("print(len(context))", no_requests)
            finally:
                await worker.aclose()
        assert result.status == "ok" and result.stdout.strip() == "11"
        assert len(launched) == 2 and worker.pid == launched[1]
        assert [e.pid for e in started.of(WorkerStart)] == [launched[1]]

    async def test_a_second_signal_is_an_error_that_names_it(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Launched once more only: a second death by the signal raises, naming the signal
        and why it can reach a worker being launched."""
        launched = signal_the_first(monkeypatch, signal.SIGINT, times=2)
        with pytest.raises(SandboxError, match=r"ended by SIGINT as it was being launched .*process group"):
            await start_worker("the context", config(isolation="none"))
        assert len(launched) == 2


_ENDS_ITSELF_ONCE = """
import os, pathlib, signal, sys
mark = pathlib.Path(sys.argv[1])
if not mark.exists():
    mark.touch()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
print("ran")
"""


class TestProbes:
    async def test_a_probe_runs_in_its_own_session(self) -> None:
        """A probe (which interpreter, does bubblewrap work, can a worker lock itself down)
        is out of the engine's session, so a terminal's Ctrl-C to the engine's group does
        not reach it, and its failure is not remembered as the sandbox's."""
        result = await run_probe([sys.executable, "-c", "import os; print(os.getsid(0), os.getpid())"])
        sid, pid = map(int, result.stdout.split())
        assert sid == pid != os.getsid(0)

    async def test_a_probe_ended_by_a_group_signal_runs_once_more(self, tmp_path: Path) -> None:
        """A probe ended by SIGINT (the signal reached it before it left the group) is run
        again, and its second result is the one given."""
        mark = tmp_path / "ran-once"
        result = await run_probe([sys.executable, "-c", _ENDS_ITSELF_ONCE, str(mark)])
        assert mark.exists() and result.returncode == 0 and result.stdout.strip() == b"ran"
