"""The response journal end to end: a 1000-chunk run killed with SIGKILL midway, then run
again with the same journal, through the command line, against the simulator in a process
of its own (which outlives the kill and logs every request with a hash of its body).

"Completed before the kill" means: logged by the server with status 200 and a finish time
before the moment of the kill (`time.monotonic()` is system-wide on Linux, the clock the
server logs by). A request the server finishes after the client died was never received,
so it is not one of them. A request of the second run "repeats" one that completed when
their bodies hash alike. No test asserts a duration.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import bwrap_works, open_sim, sim_config

from rlm_async._governor import BudgetLimits
from rlm_async._result import RLMResult
from rlm_async._rlm import RLM
from rlm_async.cli import main as cli_main
from rlm_async.sim import (
    KindLatency,
    LatencyModel,
    LogEntry,
    LogTail,
    Policies,
    PolicySpec,
    SimConfig,
    SimProcess,
)
from rlm_async.workloads import CountingWorkload, oolong_counting

pytestmark = pytest.mark.e2e

CHUNKS = 1000
# ~100 sub-calls a second at the server (8 at a time, 40-120 ms each), so run 1 reaches half
# its sub-calls a few seconds in and the kill lands mid fan-out.
SUB_LATENCY = KindLatency(ttft_s=0.08, jitter=0.5, capacity=8)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ============================================================================ plumbing


def write_config(path: Path, base_url: str, *, temperature: float | None) -> Path:
    """A CLI config whose models are served by the simulator at `base_url`."""
    temp = "" if temperature is None else f"temperature = {temperature!r}\n"
    isolation = "bwrap" if bwrap_works() else "none"
    path.write_text(
        f"""
[rlm]
max_iterations = 6

[root]
model = "sim-model"
base_url = "{base_url}"
api_key_env = ""
max_tokens = 2048
{temp}prices = {{ input_per_mtok = 1.25, cached_input_per_mtok = 0.125, output_per_mtok = 10.0 }}

[sub]
model = "sim-mini"
base_url = "{base_url}"
api_key_env = ""
max_tokens = 256
{temp}prices = {{ input_per_mtok = 0.25, cached_input_per_mtok = 0.025, output_per_mtok = 2.0 }}

[governor]
chars_per_token = 4.0

[sandbox]
isolation = "{isolation}"
""",
        encoding="utf-8",
    )
    return path


def run_command(config: Path, context: Path, query: str, journal: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rlm_async.cli",
        "run",
        "--config",
        str(config),
        "--context",
        str(context),
        "--query",
        query,
        "--journal",
        str(journal),
        "--json",
    ]


def kill_group(pid: int) -> None:
    """Remove what the killed CLI left behind (its REPL worker), all in its own session."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ============================================================================ the crash


class TestCrashAndResume:
    def test_a_run_killed_midway_resumes_without_resending_completed_calls(self, tmp_path: Path) -> None:
        """A 1000-chunk run killed with SIGKILL once the server has answered half its
        sub-calls, then run again with the same journal, gets the right count, and of the
        requests that completed before the kill at most 1% are sent again; the second
        result counts the calls it took from the journal."""
        w = oolong_counting("100k", seed=7)
        assert isinstance(w.context, str)
        context = tmp_path / "context.txt"
        context.write_text(w.context, encoding="utf-8")
        journal = tmp_path / "run.journal"
        sim_cfg = SimConfig(
            latency=LatencyModel(root=KindLatency(ttft_s=0.01), sub=SUB_LATENCY),
            policies=Policies(root=PolicySpec(name="rlm", options={"chunks": CHUNKS})),
        )
        with SimProcess(sim_cfg, log_path=tmp_path / "requests.jsonl") as sim:
            assert sim.base_url is not None
            config = write_config(tmp_path / "rlm.toml", sim.base_url, temperature=0.0)
            command = run_command(config, context, w.query, journal)

            # Run 1, killed once the server has answered half the sub-calls.
            tail = LogTail(sim.log_path)
            with (tmp_path / "run1.out").open("wb") as out:
                first = subprocess.Popen(command, stdout=out, stderr=out, start_new_session=True)
                try:
                    give_up = time.monotonic() + 120
                    while tail.answered() < CHUNKS // 2:
                        assert first.poll() is None, (tmp_path / "run1.out").read_text()
                        assert time.monotonic() < give_up, "run 1 never got halfway"
                        time.sleep(0.01)
                    killed_at = time.monotonic()
                    os.kill(first.pid, signal.SIGKILL)
                    first.wait()
                finally:
                    kill_group(first.pid)
            assert first.returncode == -signal.SIGKILL
            sim.wait_until_idle()
            run1 = sim.read_log().entries
            completed = [e for e in run1 if e.status == 200 and e.finish < killed_at]
            completed_subs = [e for e in completed if e.kind == "sub"]
            assert 0.45 * CHUNKS <= len(completed_subs) <= 0.65 * CHUNKS, len(completed_subs)
            assert Counter(e.kind for e in completed)["root"] == 2  # the peek and the fan-out turn

            # Run 2: same command, same journal.
            resumed_at = time.monotonic()
            second = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert second.returncode == 0, second.stderr
            result = json.loads(second.stdout)
            run2 = [e for e in sim.read_log().entries if e.arrival >= resumed_at]

        assert result["status"] == "ok"
        assert w.score(result["response"]), (result["response"], w.truth)

        done = {e.body_sha256 for e in completed}
        assert None not in done and len(done) == len(completed)
        repeats = [e for e in run2 if e.body_sha256 in done]
        assert len(repeats) <= 0.01 * len(completed), (len(repeats), len(completed))

        total = result["total"]
        # Every call of run 2 not answered from the journal reached the server exactly once.
        assert len(run2) == total["calls"] - total["journal_hits"]
        assert all(e.status == 200 for e in run2)
        assert total["journal_hits"] >= len(completed) - len(repeats)
        assert result["by_depth"]["1"]["journal_hits"] >= len(completed_subs) - len(repeats)
        assert result["by_depth"]["1"]["calls"] == CHUNKS


# ============================================================================ what is reused


async def run_twice(
    tmp_path: Path,
    *,
    temperature: float | None,
    reuse_nondeterministic: bool = True,
    budget: BudgetLimits | None = None,
) -> tuple[RLMResult, RLMResult, list[LogEntry], list[LogEntry]]:
    """The same 20-chunk query run twice with one journal, each run in an `RLM` of its
    own; returns both results and the server's log of each run."""
    w: CountingWorkload = oolong_counting("16k", seed=2)
    overrides: dict[str, Any] = {"temperature": temperature}
    results: list[RLMResult] = []
    logs: list[list[LogEntry]] = []
    async with open_sim(
        SimConfig(policies=Policies(root=PolicySpec(name="rlm", options={"chunks": 20})))
    ) as sim:
        config = sim_config(
            sim,
            root_overrides={**overrides, "max_tokens": 2048},
            sub_overrides=overrides,
            journal_path=str(tmp_path / "run.journal"),
            journal_reuse_nondeterministic=reuse_nondeterministic,
            budget=budget or BudgetLimits(),
        )
        for _ in range(2):
            before = len(sim.log)
            async with RLM(config=config) as rlm:
                results.append(await rlm.acompletion(w.context, w.query))
            logs.append(sim.log.entries[before:])
    for r in results:
        assert r.status == "ok" and w.score(r.response), (r.response, w.truth)
    return results[0], results[1], logs[0], logs[1]


class TestWhatIsReused:
    @pytest.mark.asyncio
    async def test_temperature_0_calls_are_answered_from_the_journal(self, tmp_path: Path) -> None:
        """Run again with temperature 0 and the same journal, a finished query sends
        nothing: every call comes from the journal, and the result says so."""
        first, second, _, sent_again = await run_twice(tmp_path, temperature=0.0)
        assert first.total.journal_hits == 0
        assert sent_again == []
        assert second.total.journal_hits == second.total.calls == first.total.calls
        assert second.total.prompt_tokens == 0 and second.total.cost_usd == 0.0

    @pytest.mark.asyncio
    async def test_calls_at_the_default_temperature_are_replayed_by_default(self, tmp_path: Path) -> None:
        """With the server's default temperature (None: sampled) and the default
        configuration, a re-run is replayed too: nothing is sent, nothing is paid twice."""
        first, second, _, sent_again = await run_twice(tmp_path, temperature=None)
        assert first.total.journal_hits == 0
        assert sent_again == []
        assert second.total.journal_hits == second.total.calls == first.total.calls

    @pytest.mark.asyncio
    async def test_a_budget_does_not_make_root_turns_miss(self, tmp_path: Path) -> None:
        """With a budget, the root's prompts carry a `[budget left: ...]` line whose
        figures differ on the re-run (journal hits spend nothing); the line stays out of
        the key, so the re-run still sends nothing, its later root turns included."""
        budget = BudgetLimits(max_calls=1_000, max_total_tokens=10_000_000)
        first, second, log1, sent_again = await run_twice(tmp_path, temperature=0.0, budget=budget)
        assert sum(e.kind == "root" for e in log1) >= 2  # turns after the first carry the line
        assert sent_again == []
        assert second.total.journal_hits == second.total.calls == first.total.calls

    @pytest.mark.asyncio
    async def test_opting_out_sends_sampled_calls_again(self, tmp_path: Path) -> None:
        """With journal_reuse_nondeterministic=False, the second run reuses nothing at the
        default temperature: the server receives every request of the first run again."""
        first, second, log1, log2 = await run_twice(tmp_path, temperature=None, reuse_nondeterministic=False)
        assert first.total.journal_hits == second.total.journal_hits == 0
        assert Counter(e.body_sha256 for e in log2) == Counter(e.body_sha256 for e in log1)
        assert len(log2) == second.total.calls


# ============================================================================ a file that is not ours


class TestForeignJournal:
    @pytest.mark.parametrize("kind", ["text", "sqlite"])
    @pytest.mark.parametrize(
        "served_by",
        ["endpoint", "in-process simulator"],
    )
    def test_the_cli_refuses_a_file_that_is_not_a_journal(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, served_by: str
    ) -> None:
        """`rlm-async run --journal F` where F is a text file or another application's
        SQLite database exits 2 with one line naming the file, and leaves F untouched —
        whether the models are an endpoint (never reached) or the in-process simulator."""
        path = tmp_path / "notes.db"
        if kind == "text":
            path.write_text("my notes, not a journal\n" * 40, encoding="utf-8")
        else:
            db = sqlite3.connect(path)
            db.execute("CREATE TABLE contacts (name TEXT)")
            db.commit()
            db.close()
        before = path.read_bytes()
        context = tmp_path / "context.txt"
        context.write_text("a line\n" * 50, encoding="utf-8")
        if served_by == "endpoint":
            # Port 9 (discard): nothing is sent, since the journal is opened before any call.
            config = write_config(tmp_path / "rlm.toml", "http://127.0.0.1:9/v1", temperature=0.0)
        else:
            config = CONFIGS / "sim.toml"
        argv = ["run", "--config", str(config), "--context", str(context), "--query", "How many lines?"]
        status = cli_main([*argv, "--journal", str(path), "--json"])
        out, err = capsys.readouterr()
        assert (status, out) == (2, "")
        assert err.count("\n") == 1 and err.startswith("rlm-async: error: ")
        assert str(path) in err and "not an rlm_async response journal" in err
        assert path.read_bytes() == before
