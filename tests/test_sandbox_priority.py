"""REPL workers run at a lower CPU priority than the engine (`SandboxConfig.nice`): their
own nice value, which the code cannot take back, and, where the kernel schedules each
session as a group (autogroup), their session's group. Observed in the kernel's own
numbers: `os.nice(0)` inside the worker, `/proc/<pid>/autogroup` of its session."""

from __future__ import annotations

import io
import os

import pytest
from test_sandbox_support import BWRAP_WORKS, LANDLOCK_WORKS, config, open_worker

from rlm_async.exceptions import ConfigError
from rlm_async.sandbox import SandboxConfig, WorkerRequest, _process, diagnose
from rlm_async.sandbox import _pool as pool_module
from rlm_async.sandbox import _priority as priority
from rlm_async.sandbox._pool import WorkerPool
from rlm_async.sandbox._worker import Worker

pytestmark = pytest.mark.anyio

TIERS = [
    pytest.param(
        "bubblewrap", marks=pytest.mark.skipif(not BWRAP_WORKS, reason="bubblewrap cannot run here")
    ),
    pytest.param("landlock", marks=pytest.mark.skipif(not LANDLOCK_WORKS, reason="no Landlock here")),
    "none",
]
ENGINE_NICE = os.nice(0)
needs_autogroup = pytest.mark.skipif(
    not priority.autogroup_on(), reason="the kernel's autogroup is off or missing here"
)


async def refuse(request: WorkerRequest) -> list[str]:
    raise AssertionError(f"unexpected sub-call {request}")


def autogroup_nice(pid: int) -> int:
    with open(f"/proc/{pid}/autogroup", encoding="ascii") as f:
        return int(f.read().split()[-1])  # "/autogroup-123 nice 19"


def session_leader(worker: Worker) -> int:
    """The host pid of the sandbox's init (bubblewrap's child), which leads its session."""
    with open(f"/proc/{worker.pid}/task/{worker.pid}/children", encoding="ascii") as f:
        return int(f.read().split()[0])


def watch_lowering(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """For each worker lowered from now on, whether it had said `hello` by then."""
    lowered_while_up: list[bool] = []
    original = _process.WorkerProcess.lower_priority

    def watched(self: _process.WorkerProcess) -> priority.Lowered:
        before = self.priority
        answer = original(self)
        if answer == "lowered" and before != "lowered":
            lowered_while_up.append(self.up)
        return answer

    monkeypatch.setattr(_process.WorkerProcess, "lower_priority", watched)
    return lowered_while_up


def engine_group() -> str:
    """The engine's own group as the kernel shows it: empty where the engine never left
    init's session (the root group, as under CI's runner), which counts as nice 0."""
    with open("/proc/self/autogroup", encoding="ascii") as f:
        return f.read()


async def cell_output(worker: Worker, code: str) -> str:
    result = await worker.run_cell(code, refuse)
    assert result.error is None, result.error
    return result.stdout


class TestTheWorkersNice:
    @pytest.mark.parametrize("isolation", TIERS)
    async def test_code_runs_below_the_engine(self, isolation: str) -> None:
        """With the default, the code's own nice value is the engine's plus 19 (capped)."""
        async with open_worker(isolation=isolation) as worker:
            out = await cell_output(worker, "import os\nprint(os.nice(0))")
        assert int(out) == min(19, ENGINE_NICE + 19)

    @pytest.mark.parametrize("isolation", TIERS)
    async def test_nice_0_keeps_the_engines(self, isolation: str) -> None:
        async with open_worker(isolation=isolation, nice=0) as worker:
            out = await cell_output(worker, "import os\nprint(os.nice(0))")
        assert int(out) == ENGINE_NICE

    @pytest.mark.parametrize(
        "isolation",
        [p for p in TIERS if p != "none"],  # "none" as root keeps root, which may renice itself
    )
    async def test_the_code_cannot_take_it_back(self, isolation: str) -> None:
        """Neither its own nice value (that needs CAP_SYS_NICE) nor its session group's (the
        kernel lets a process set its own group's back to 0: under bubblewrap /proc is
        read-only, under landlock out of reach)."""
        code = (
            "import os\n"
            "try:\n    os.nice(-1)\n    print('nice lowered')\n"
            "except PermissionError:\n    print('refused')\n"
            "try:\n"
            "    fd = os.open('/proc/self/autogroup', os.O_WRONLY)\n"
            "    os.write(fd, b'0')\n"
            "    print('group raised')\n"
            "except OSError:\n    print('refused')\n"
            "print(os.nice(0))"
        )
        async with open_worker(isolation=isolation, nice=5) as worker:
            out = await cell_output(worker, code)
        assert out.split() == ["refused", "refused", str(min(19, ENGINE_NICE + 5))]

    @pytest.mark.parametrize("value", [-1, 20, 1.5, True, "19"])
    def test_out_of_range_is_refused(self, value: object) -> None:
        with pytest.raises(ConfigError, match="nice must be a whole number from 0 to 19"):
            SandboxConfig(nice=value)  # type: ignore[arg-type]


@needs_autogroup
class TestTheSessionGroup:
    """Where autogroup is on, each worker's session is a scheduling group of its own; its
    nice value is lowered from the engine (the session's leader: the sandbox's init under
    bubblewrap, the worker's top process otherwise)."""

    @pytest.mark.parametrize("isolation", TIERS)
    async def test_a_pooled_workers_session_is_lowered(self, isolation: str) -> None:
        """A pool's worker (which retries while it waits, past an unprivileged engine's
        rate limit) is in a session group 19 below the engine's."""
        engines = engine_group()
        async with WorkerPool(config(isolation=isolation), size=1) as pool:
            await pool.wait_full()
            worker = await pool.start_worker("")
            try:
                if isolation == "landlock":  # the lock-down hides /proc/self/autogroup
                    seen = autogroup_nice(worker.pid)
                else:
                    out = await cell_output(worker, "print(open('/proc/self/autogroup').read())")
                    seen = int(out.split()[-1])
            finally:
                await worker.aclose()
        assert seen == min(19, priority._own_nice() + 19)
        assert engine_group() == engines  # the engine's own is untouched

    @needs_autogroup
    @pytest.mark.skipif(os.geteuid() != 0, reason="unprivileged, the kernel allows one change per 100 ms")
    @pytest.mark.parametrize("isolation", TIERS)
    async def test_a_pre_start_is_lowered_before_its_interpreter_is_up(
        self, isolation: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A pool's pre-start (no query waits for it) is lowered as soon as its session
        exists: its interpreter's start-up runs below the workers serving queries, not
        beside the engine. One started on demand, which a query waits for, is lowered at
        `hello`: its start-up keeps the engine's priority."""
        lowered_while_up = watch_lowering(monkeypatch)
        async with WorkerPool(config(isolation=isolation), size=1) as pool:
            await pool.wait_full()
            worker = await pool.start_worker("")
            try:
                leader = worker.pid if isolation != "bubblewrap" else session_leader(worker)
                assert autogroup_nice(leader) == 19
            finally:
                await worker.aclose()
        assert lowered_while_up[0] is False
        lowered_while_up.clear()
        async with open_worker(isolation=isolation) as worker:
            leader = worker.pid if isolation != "bubblewrap" else session_leader(worker)
            assert autogroup_nice(leader) == 19
        assert lowered_while_up == [True]

    @pytest.mark.skipif(os.geteuid() != 0, reason="unprivileged, the kernel allows one change per 100 ms")
    async def test_as_root_every_worker_at_once(self) -> None:
        """Root has no rate limit: workers started back to back are each lowered."""
        async with open_worker(isolation="none") as first, open_worker(isolation="none") as second:
            assert [autogroup_nice(first.pid), autogroup_nice(second.pid)] == [19, 19]

    async def test_nice_0_leaves_the_session_alone(self) -> None:
        async with open_worker(isolation="none", nice=0) as worker:
            assert autogroup_nice(worker.pid) == 0


class TestTheEnginesOwnGroup:
    @pytest.mark.parametrize(("shown", "nice"), [("/autogroup-7 nice 3\n", 3), ("", 0)])
    def test_the_root_group_counts_as_nice_0(
        self, monkeypatch: pytest.MonkeyPatch, shown: str, nice: int
    ) -> None:
        """An engine that never left init's session (CI's runner) is in the root group, whose
        file reads empty: it weighs as nice 0, and a worker is lowered to 19 from there."""
        monkeypatch.setattr(priority, "open", lambda *_a, **_k: io.StringIO(shown), raising=False)
        assert priority._own_nice() == nice


class TestThePoolWaitsForItsTurn:
    async def test_a_busy_answer_is_tried_again(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The kernel's rate limit ("busy") makes a pre-start try again after 0.1 s, until
        lowered (tries begin as the worker's session does, and go on after `hello`); the
        worker is handed out only then."""
        answers: list[priority.Lowered] = ["busy", "busy", "busy"]
        calls: list[int] = []

        def fake_lower(pid: int, nice: int) -> priority.Lowered:
            calls.append(pid)
            return answers.pop(0) if answers else "lowered"

        monkeypatch.setattr(_process, "lower_session", fake_lower)
        monkeypatch.setattr(_process, "autogroup_on", lambda: True)
        slept: list[float] = []

        async def sleep(seconds: float) -> None:
            slept.append(seconds)

        async with WorkerPool(config(isolation="none"), size=1, sleep=sleep) as pool:
            # The first worker is pre-started as the pool opens, before any refill runs.
            assert calls == [calls[0]] * 4 and set(slept) <= {0.1}
            worker = await pool.start_worker("")
            assert worker.pid == calls[0] and worker.priority == "lowered"
            await worker.aclose()
        assert pool_module._PRIORITY_TRIES >= 4


class TestTheDoctorSaysSo:
    async def test_the_check_names_the_nice_value_and_the_session(self) -> None:
        """`rlm-async doctor --sandbox` reports the nice value the code ran at and whether
        its session's group was lowered."""
        found = await diagnose(config())
        check = found.worker_check or ""
        assert f"at nice {min(19, ENGINE_NICE + 19)}" in check, check
        if priority.autogroup_on() and os.geteuid() == 0:
            assert "its session's scheduling group lowered as much" in check, check
        found = await diagnose(config(nice=0))
        assert f"at nice {ENGINE_NICE}" in (found.worker_check or "")
        assert "scheduling group" not in (found.worker_check or "")
