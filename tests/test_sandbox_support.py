"""Shared helpers for the sandbox tests (imported by test_sandbox*.py and test_adversarial.py),
and the tests of those helpers themselves.

A secret is planted in this process's environment at import; tests assert it never shows
up in anything a worker can produce. (`os.environ` changes after start-up do not reach
`/proc/self/environ`; `test_adversarial` also starts an engine subprocess that has the
secret in its initial environment, for the `/proc/<ppid>/environ` attack.)
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from rlm_async.sandbox import SandboxConfig, Worker, WorkerRequest, start_worker
from rlm_async.sandbox import _launch as launch
from rlm_async.sandbox import _procs as procs

pytestmark = pytest.mark.anyio

SECRET = "rlm-test-secret-" + uuid.uuid4().hex
os.environ["RLM_TEST_SECRET"] = SECRET

SYSTEM_PYTHON = "/usr/bin/python3.11" if os.access("/usr/bin/python3.11", os.X_OK) else None
"""An interpreter in world-readable directories: a fallback worker can drop root with it."""


def _bwrap_works() -> bool:
    bwrap = launch.find_bwrap(None)
    if bwrap is None:
        return False
    interp = anyio.run(launch.find_interpreter, None)
    why = anyio.run(
        lambda: launch.probe_bwrap(bwrap, interp, allow_network=False, may_setuid=os.geteuid() == 0)
    )
    return why is None


BWRAP_WORKS = _bwrap_works()
needs_bwrap = pytest.mark.skipif(not BWRAP_WORKS, reason="bubblewrap cannot run here")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (private worker uids)")
needs_system_python = pytest.mark.skipif(SYSTEM_PYTHON is None, reason="no /usr/bin/python3.11")


def _system_python_can_drop_root() -> bool:
    if SYSTEM_PYTHON is None:
        return False
    return launch.can_drop_uid_unsandboxed(anyio.run(launch.find_interpreter, SYSTEM_PYTHON))


SYSTEM_PYTHON_DROPS_ROOT = _system_python_can_drop_root()
"""Whether a fallback worker started as root with SYSTEM_PYTHON switches to a private uid:
only when an unprivileged uid can reach the interpreter and this checkout's worker bootstrap.
A clone under a 0700 directory (what `mktemp -d` makes) cannot be reached, and the engine
then rightly keeps root (tested in test_sandbox.py)."""

needs_droppable_root = pytest.mark.skipif(
    not SYSTEM_PYTHON_DROPS_ROOT,
    reason="an unprivileged uid cannot reach /usr/bin/python3.11 or this checkout (a directory on "
    "the way is not world-searchable, e.g. a clone under mktemp -d): the fallback worker rightly "
    "keeps root here; test_fallback_keeps_root_where_no_private_uid_can_reach_the_bootstrap covers that",
)


DEFAULT_ISOLATION = os.environ.get("RLM_TEST_SANDBOX_ISOLATION") or ("bwrap" if BWRAP_WORKS else "none")
"""The functional tests run under bubblewrap where it works, else in the fallback (set
RLM_TEST_SANDBOX_ISOLATION=none to run them there anyway). The adversarial suite always
requires bubblewrap: its attacks are only safe inside the sandbox."""


def config(**overrides: Any) -> SandboxConfig:
    """Test defaults: generous timeouts (tests assert statuses, never durations; a loaded CI
    machine must not turn an ok cell into a timeout)."""
    base: dict[str, Any] = {"isolation": DEFAULT_ISOLATION, "cell_timeout_s": 30.0, "start_timeout_s": 60.0}
    base.update(overrides)
    return SandboxConfig(**base)


class Recorder:
    """An `on_request` that answers "echo:<prompt>" and keeps every request."""

    def __init__(self, reply: str = "echo:") -> None:
        self.requests: list[WorkerRequest] = []
        self.reply = reply
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0

    async def __call__(self, request: WorkerRequest) -> list[str]:
        self.requests.append(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await anyio.sleep(self.delay)
            return [self.reply + p for p in request.prompts]
        finally:
            self.in_flight -= 1

    def all_text(self) -> str:
        return "\n".join(p for r in self.requests for p in r.prompts)


def left_behind(pid: int, uid: int | None, extra: Iterable[int] = ()) -> list[procs.Proc]:
    """Processes of a worker that still run: its group/session, its private uid, and any
    host pids a test collected. Zombies do not count: they have exited, and only wait for
    init to reap them (which this machine's init does lazily)."""
    found = {p.pid: p for p in procs.survivors(root=None, group=pid, uid=uid)}
    for other in extra:
        proc = procs._read_proc(other)
        if proc is not None:
            found[other] = proc
    return [p for p in found.values() if p.state not in ("Z", "X")]


async def assert_nothing_left(pid: int, uid: int | None, extra: Iterable[int] = ()) -> None:
    """Poll (up to 10 s) until no process of the worker is left running."""
    extra = list(extra)
    left: list[procs.Proc] = []
    for _ in range(200):
        left = left_behind(pid, uid, extra)
        if not left:
            return
        await anyio.sleep(0.05)
    raise AssertionError(f"processes left behind by worker {pid}: {left}")


@asynccontextmanager
async def open_worker(context: Any = "", **overrides: Any) -> AsyncIterator[Worker]:
    """A worker that is closed at the end, then checked to have left no process behind."""
    worker = await start_worker(context, config(**overrides))
    seen = [(worker.pid, worker.uid)]
    try:
        yield worker
    finally:
        seen.append((worker.pid, worker.uid))
        await worker.aclose()
        for pid, uid in set(seen):
            await assert_nothing_left(pid, uid)


def assert_no_secret(*texts: object) -> None:
    for text in texts:
        assert SECRET not in str(text)


# ---------------------------------------------------------------------------- self-tests
class TestLeftBehind:
    async def test_detects_a_live_process_in_the_group(self) -> None:
        """The leftover scan finds a running process by its process group."""
        proc = await anyio.open_process(
            [sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True
        )
        try:
            assert [p.pid for p in left_behind(proc.pid, None)] == [proc.pid]
        finally:
            proc.kill()
            await proc.wait()
        assert left_behind(proc.pid, None) == []

    async def test_kill_all_stops_a_forking_tree(self) -> None:
        """kill_all kills a process and the children it keeps forking, leaving nothing."""
        code = "import os, time\nfor _ in range(5):\n    os.fork() or time.sleep(60)\ntime.sleep(60)"
        proc = await anyio.open_process([sys.executable, "-c", code], start_new_session=True)
        await anyio.sleep(0.3)
        await anyio.to_thread.run_sync(lambda: procs.kill_all(root=proc.pid, group=proc.pid, uid=None))
        await proc.wait()
        await assert_nothing_left(proc.pid, None)
