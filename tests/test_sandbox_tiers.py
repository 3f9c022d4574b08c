"""Choosing an isolation tier: "auto" takes the strongest that works and refuses rather
than run unisolated; a missing kernel feature (simulated here) makes a tier unavailable
with a message naming the fix; the result, the worker.start event and the doctor say which
tier ran. Also the unprivileged tier's own pieces (seccomp programs, the engine's
non-dumpable flag, an interpreter under a 0700 directory) and the "none" tier's cleanup."""

from __future__ import annotations

import ctypes
import struct
import sys
import textwrap
from pathlib import Path

import anyio
import pytest
from conftest import EventLog, rlm_config
from test_sandbox_support import (
    LANDLOCK_WORKS,
    SYSTEM_PYTHON,
    assert_nothing_left,
    config,
    needs_droppable_root,
    needs_landlock,
    needs_root,
    open_worker,
)

from rlm_async import RLM
from rlm_async._events import WorkerStart
from rlm_async._types import ModelRequest
from rlm_async.cli import main as cli_main
from rlm_async.exceptions import IsolationUnavailable
from rlm_async.sandbox import SandboxConfig, WorkerRequest, diagnose, start_worker
from rlm_async.sandbox import _landlock as landlock
from rlm_async.sandbox import _seccomp as seccomp
from rlm_async.sandbox import _unprivileged as unprivileged
from rlm_async.testing import ScriptedTransport

pytestmark = pytest.mark.anyio

NO_BWRAP = "/nonexistent/bwrap"


async def refuse(request: WorkerRequest) -> list[str]:
    raise AssertionError(f"unexpected sub-call {request}")


@pytest.fixture
def no_landlock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate a kernel without Landlock (ABI 0), as on Linux < 5.13 or without lsm=landlock."""
    monkeypatch.setattr(landlock, "abi", lambda: 0)


class TestChoosingATier:
    def test_old_name_bwrap_means_bubblewrap(self) -> None:
        """isolation="bwrap" (the old name) is accepted as "bubblewrap"."""
        assert SandboxConfig(isolation="bwrap").isolation == "bubblewrap"  # type: ignore[arg-type]

    @needs_landlock
    async def test_auto_without_bubblewrap_uses_landlock(self) -> None:
        """With bubblewrap absent, "auto" runs the worker under the landlock tier."""
        async with open_worker(isolation="auto", bwrap_path=NO_BWRAP) as worker:
            result = await worker.run_cell("import os\nprint(os.getuid() != 0)", refuse)
        assert worker.tier == "landlock" and worker.isolated
        assert result.stdout == "True\n"

    async def test_auto_with_neither_refuses_and_names_the_fix(self, no_landlock: None) -> None:
        """Neither bubblewrap nor Landlock: "auto" refuses (no worker runs), and the message
        names what is missing and each fix, the explicit opt-out included."""
        with pytest.raises(IsolationUnavailable) as caught:
            await start_worker("", config(isolation="auto", bwrap_path=NO_BWRAP))
        message = str(caught.value)
        assert "refusing to run model code" in message
        assert "bubblewrap: no bwrap executable" in message
        assert "landlock: the kernel has no Landlock" in message
        assert "install bubblewrap" in message and "isolation='none'" in message

    async def test_landlock_required_but_missing(self, no_landlock: None) -> None:
        """isolation="landlock" on a kernel without Landlock raises IsolationUnavailable."""
        with pytest.raises(IsolationUnavailable, match="landlock: the kernel has no Landlock"):
            await start_worker("", config(isolation="landlock"))

    def test_an_unprivileged_engine_needs_signal_scoping(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Not root and Landlock ABI < 6: the worker would share the engine's uid with no
        signal scoping, so the tier is unavailable and says why."""
        monkeypatch.setattr(landlock, "abi", lambda: 4)
        why = unprivileged._static_reason(root=False)
        assert why is not None and "ABI 4" in why and "6.12" in why
        assert unprivileged._static_reason(root=True) is None or seccomp.arch() is None

    def test_no_seccomp_filter_makes_the_tier_unavailable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """On a CPU without a filter (not x86-64 or aarch64) the tier is unavailable."""
        monkeypatch.setattr(seccomp, "arch", lambda: None)
        monkeypatch.setattr(landlock, "abi", lambda: 7)
        assert "architecture" in (unprivileged._static_reason(root=True) or "")

    async def test_none_is_an_explicit_opt_in(self) -> None:
        """isolation="none" runs a plain subprocess without warning, and says so."""
        async with open_worker("ctx", isolation="none") as worker:
            result = await worker.run_cell("print(context)", refuse)
        assert worker.tier == "none" and not worker.isolated
        assert result.stdout == "ctx\n"


def scripted_root(request: ModelRequest) -> str:
    if sum(m.role == "assistant" for m in request.messages) == 0:
        return "```repl\nprint(len(context))\n```"
    return "FINAL(done)"


class TestReporting:
    @needs_landlock
    async def test_result_and_event_say_which_tier_ran(self) -> None:
        """RLMResult.isolation and the worker.start event name the tier the workers ran under."""
        events = EventLog()
        sandbox = config(isolation="landlock")
        cfg = rlm_config(sandbox=sandbox, sub=None)
        async with RLM(config=cfg, transport=ScriptedTransport(scripted_root), event_sinks=[events]) as rlm:
            result = await rlm.acompletion("abc", "q")
        assert result.status == "ok" and result.isolation == "landlock"
        assert result.to_dict()["isolation"] == "landlock"
        starts = [e for e in events.events if isinstance(e, WorkerStart)]
        assert starts and all(e.tier == "landlock" for e in starts)

    async def test_doctor_refuses_where_no_tier_works(self, no_landlock: None) -> None:
        """The doctor reports every tier unavailable (with why) and the refusal."""
        found = await diagnose(SandboxConfig(isolation="auto", bwrap_path=NO_BWRAP))
        assert found.chosen is None and "refusing" in (found.refusal or "")
        assert {t.tier: t.available for t in found.tiers} == {
            "bubblewrap": False,
            "landlock": False,
            "none": True,
        }

    @needs_landlock
    async def test_doctor_starts_a_worker_under_the_chosen_tier(self) -> None:
        """The doctor proves the chosen tier by running a cell in it."""
        found = await diagnose(SandboxConfig(isolation="landlock"))
        assert found.chosen == "landlock"
        assert (found.worker_check or "").startswith("worker started"), found.worker_check
        assert found.to_dict()["isolates"]["network"].startswith("yes")

    @needs_landlock
    def test_doctor_command(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`rlm-async doctor --sandbox --isolation landlock` prints the tier and exits 0."""
        assert cli_main(["doctor", "--sandbox", "--isolation", "landlock"]) == 0
        out = capsys.readouterr().out
        assert "runs model code under: landlock" in out and "check: worker started" in out


class TestUnprivilegedTierPieces:
    @pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
    @pytest.mark.parametrize("network", [True, False])
    def test_seccomp_programs_are_well_formed(
        self, monkeypatch: pytest.MonkeyPatch, arch: str, network: bool
    ) -> None:
        """Both architectures' programs build; every jump lands inside the program and the
        last instructions return (classic BPF only jumps forward)."""
        monkeypatch.setattr(seccomp, "arch", lambda: arch)
        program = seccomp.build(network=network)
        assert program is not None and len(program) % 8 == 0
        insns = [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
        for i, (code, jt, jf, _) in enumerate(insns):
            if code & 0x07 == 0x05:  # BPF_JMP
                assert i + 1 + max(jt, jf) < len(insns)
        assert insns[-1][0] == 0x06
        audit = 0xC000003E if arch == "x86_64" else 0xC00000B7
        assert insns[1][3] == audit

    @needs_landlock
    async def test_the_engine_becomes_non_dumpable(self) -> None:
        """Planning the landlock tier makes this process non-dumpable (PR_GET_DUMPABLE = 0)."""
        async with open_worker(isolation="landlock"):
            pass
        assert ctypes.CDLL(None).prctl(3, 0, 0, 0, 0) == 0

    @needs_landlock
    @needs_root
    async def test_interpreter_under_a_0700_directory_still_runs_unprivileged(self, tmp_path: Path) -> None:
        """The engine's interpreter lies under a directory only root can enter (pyenv in
        /root): the worker still switches to its private uid, imports the stdlib, and runs
        the same interpreter in a subprocess; it still cannot read a file beside it."""
        private = tmp_path / "private"
        private.mkdir(mode=0o700)
        venv = [sys.executable, "-m", "venv", "--copies", "--without-pip", str(private / "venv")]
        await anyio.run_process(venv)
        (private / "secret.txt").write_text("do not read")
        python = str(private / "venv" / "bin" / "python")
        code = textwrap.dedent(
            f"""
            import os, subprocess, sys, json, decimal
            print(os.getuid() != 0)
            print(subprocess.run([sys.executable, '-c', 'import email; print(1)'], capture_output=True).stdout)
            try:
                open({str(private / "secret.txt")!r}).read()
                print('read')
            except OSError as e:
                print(type(e).__name__)
            """
        )
        async with open_worker(isolation="landlock", python=python) as worker:
            result = await worker.run_cell(code, refuse)
        assert worker.uid is not None
        assert result.stdout.splitlines() == ["True", "b'1\\n'", "PermissionError"], result

    @pytest.mark.skipif(not LANDLOCK_WORKS, reason="the landlock tier cannot run here")
    async def test_a_lock_down_failure_stops_the_worker(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A rule that cannot be added makes the worker fail to start: no code runs half-confined."""
        real = unprivileged.lockdown_spec

        def broken(*args: object, **kwargs: object) -> dict[str, object]:
            spec = real(*args, **kwargs)  # type: ignore[arg-type]
            spec["rules"] = [*spec["rules"], ["/usr", 1 << 40]]  # an access right no kernel has
            return spec

        monkeypatch.setattr(unprivileged, "lockdown_spec", broken)
        with pytest.raises(Exception, match="landlock"):
            await start_worker("", config(isolation="landlock"))


class TestNoneTierCleanup:
    async def test_children_that_ignore_sigterm_are_killed(self) -> None:
        """Even without isolation, a child that ignores SIGTERM does not survive aclose."""
        code = (
            "import subprocess, sys\np = subprocess.Popen([sys.executable, '-c', "
            "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)'])\nprint(p.pid)"
        )
        async with open_worker(isolation="none") as worker:
            child = int((await worker.run_cell(code, refuse)).stdout.split()[0])
        await assert_nothing_left(worker.pid, worker.uid, [child])

    async def test_orphaned_grandchildren_are_killed(self) -> None:
        """Without isolation, a double-forked setsid grandchild is still found and killed."""
        code = textwrap.dedent(
            """
            import os, time
            r, w = os.pipe()
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    os.write(w, str(os.getpid()).encode())
                    time.sleep(300)
                os._exit(0)
            print(os.read(r, 100).decode())
            """
        )
        async with open_worker(isolation="none") as worker:
            grandchild = int((await worker.run_cell(code, refuse)).stdout.strip())
        await assert_nothing_left(worker.pid, worker.uid, [grandchild])

    @needs_root
    @needs_droppable_root
    async def test_dropped_root_cannot_kill_the_engine(self) -> None:
        """A "none" worker that dropped root gets EPERM signalling the engine."""
        code = "import os\ntry:\n    os.kill(os.getppid(), 9)\nexcept OSError as e:\n    print('refused', e.errno)"
        async with open_worker(isolation="none", python=SYSTEM_PYTHON) as worker:
            assert worker.uid is not None
            result = await worker.run_cell(code, refuse)
        assert result.stdout.strip() == "refused 1"
