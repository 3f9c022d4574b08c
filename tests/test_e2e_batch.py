"""Batch pipelines end to end: `rlm-async batch` against the simulator in a process of its
own, which logs every request it serves. Every check is on what the server observed
(requests, tokens, dollars at the configured prices) and on the output rows; no test
asserts a duration.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from _batch_config import PRICES, read_rows, sim_config, workloads, write_config, write_input

from rlm_async.cli import main as cli_main
from rlm_async.sim import (
    Faults,
    KindLatency,
    LatencyModel,
    LogEntry,
    SimProcess,
    priced,
)
from rlm_async.workloads import s_niah

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FAULTS = Faults(error_500=0.03, error_429=0.02, drop=0.02, malformed=0.01, retry_after_s=0.05)


# ============================================================================ plumbing


def batch_args(input_path: Path, out: Path, config: Path, *extra: str) -> list[str]:
    return ["batch", str(input_path), "--out", str(out), "--config", str(config), "--quiet", *extra]


def answered_ok(entries: list[LogEntry]) -> list[LogEntry]:
    return [e for e in entries if e.outcome in ("ok", "slow")]


# ============================================================================ the proofs


class TestBatchWithFaults:
    def test_every_input_gets_one_row_and_the_right_answer(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """200 queries against a server that fails about 8% of requests (500, 429,
        dropped connections, cut bodies): every input has exactly one row, every answer is
        right, and the rows account for every request the server answered and its price."""
        items = workloads(200)
        source = write_input(tmp_path / "in.jsonl", items)
        out = tmp_path / "out.jsonl"
        with SimProcess(sim_config(faults=FAULTS), log_path=tmp_path / "requests.jsonl") as sim:
            assert sim.base_url is not None
            config = write_config(tmp_path / "rlm.toml", sim.base_url)
            code = cli_main(batch_args(source, out, config, "--concurrency", "16", "--json"))
            sim.wait_until_idle()
            log = sim.read_log().entries
        summary = json.loads(capsys.readouterr().out)
        rows = read_rows(out)
        assert sorted(r["id"] for r in rows) == sorted(items)
        wrong = [
            (r["id"], r["answer"], items[r["id"]].truth)
            for r in rows
            if not items[r["id"]].score(r["answer"])
        ]
        assert wrong == []
        assert {r["status"] for r in rows} == {"ok"}
        assert code == 0 and summary["by_status"] == {"ok": 200} and summary["exit_code"] == 0
        assert Counter(e.outcome for e in log)["error_500"] > 0  # the faults did happen
        served = answered_ok(log)
        assert sum(r["usage"]["calls"] - r["usage"]["failed_calls"] for r in rows) == len(served)
        assert sum(r["cost_usd"] for r in rows) == pytest.approx(priced(served, PRICES), rel=1e-6)


class TestKillAndResume:
    def test_a_batch_killed_halfway_finishes_on_rerun_paying_almost_nothing_twice(
        self, tmp_path: Path
    ) -> None:
        """`rlm-async batch` killed with SIGKILL once half the rows are written, then run
        again with the same output and journal: every input ends with exactly one row and
        the right answer, and of the requests the server completed a second or more before
        the kill at most 1% are sent again.

        An answer the server sent in the last instant before the kill may not have reached
        the client's journal (read, parsed, committed with its fsync) when the kill came;
        paying for it again is what a crash costs. Counting those too made the bound a
        race with the machine's load (it failed once beside a parallel suite); a second
        is far more than a loaded machine takes to journal an answer it received."""
        items = workloads(200)
        source = write_input(tmp_path / "in.jsonl", items)
        out = tmp_path / "out.jsonl"
        journal = tmp_path / "batch.journal"
        # Eight sub-calls a query and 8 queries at once: the requests the server completed
        # in the instant before the kill (answered, but not yet journaled by the client) are
        # a small share of what completed before it.
        with SimProcess(sim_config(chunks=8), log_path=tmp_path / "requests.jsonl") as sim:
            assert sim.base_url is not None
            config = write_config(tmp_path / "rlm.toml", sim.base_url)
            args = batch_args(source, out, config, "--journal", str(journal), "--concurrency", "8")
            command = [sys.executable, "-m", "rlm_async.cli", *args]
            with (tmp_path / "run1.log").open("wb") as log1:
                first = subprocess.Popen(command, stdout=log1, stderr=log1, start_new_session=True)
                try:
                    give_up = time.monotonic() + 150
                    while not out.exists() or out.read_bytes().count(b"\n") < len(items) // 2:
                        assert first.poll() is None, (tmp_path / "run1.log").read_text()
                        assert time.monotonic() < give_up, "run 1 never got halfway"
                        time.sleep(0.02)
                    killed_at = time.monotonic()
                    os.killpg(first.pid, signal.SIGKILL)
                    first.wait()
                finally:
                    try:
                        os.killpg(first.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            assert first.returncode == -signal.SIGKILL
            sim.wait_until_idle()
            completed = [e for e in sim.read_log().entries if e.status == 200 and e.finish < killed_at]
            rows_at_kill = len(read_rows_tolerant(out))
            assert len(items) // 2 <= rows_at_kill < len(items)

            resumed_at = time.monotonic()
            second = subprocess.run(command, capture_output=True, text=True, timeout=170)
            assert second.returncode == 0, second.stderr
            run2 = [e for e in sim.read_log().entries if e.arrival >= resumed_at]

        rows = read_rows(out)
        assert sorted(r["id"] for r in rows) == sorted(items)  # one row each, none twice
        assert all(items[r["id"]].score(r["answer"]) for r in rows)
        settled = {e.body_sha256 for e in completed if e.finish < killed_at - 1.0}
        assert len(settled) >= len(completed) // 3  # a good share of the answers: the bound says something
        repeats = [e for e in run2 if e.body_sha256 in settled]
        assert len(repeats) <= 0.01 * len(settled), (len(repeats), len(settled))
        # The queries cut short by the kill took their paid calls from the journal.
        assert sum(r["usage"]["journal_hits"] for r in rows) > 0


def in_flight(health_url: str) -> int:
    """Requests the simulator is serving now (its /health)."""
    with urllib.request.urlopen(health_url, timeout=10) as response:
        return int(json.loads(response.read())["in_flight"])


def read_rows_tolerant(path: Path) -> list[dict[str, Any]]:
    """Rows of a file a crash may have left with a torn last line."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


class TestBatchCap:
    def test_a_cap_below_what_the_batch_needs_is_never_crossed(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A dollar cap that covers about a third of 60 queries: what the server charged
        (its own usage at the configured prices) stays under the cap, no query is cut off
        halfway, the rest get `not_started` rows naming the budget, and the exit code (3)
        and the summary say so."""
        items = workloads(60)
        source = write_input(tmp_path / "in.jsonl", items)
        out = tmp_path / "out.jsonl"
        cap = 0.02
        with SimProcess(sim_config(), log_path=tmp_path / "requests.jsonl") as sim:
            assert sim.base_url is not None
            config = write_config(tmp_path / "rlm.toml", sim.base_url)
            code = cli_main(
                batch_args(source, out, config, "--budget-usd", str(cap), "--concurrency", "8", "--json")
            )
            sim.wait_until_idle()
            log = sim.read_log().entries
        summary = json.loads(capsys.readouterr().out)
        rows = read_rows(out)
        assert sorted(r["id"] for r in rows) == sorted(items)
        spent = priced(log, PRICES)
        assert 0 < spent <= cap
        statuses = Counter(r["status"] for r in rows)
        assert statuses["not_started"] > 0 and statuses["ok"] > 0
        assert set(statuses) == {"ok", "not_started"}  # none cut off halfway
        assert all(r["error"].startswith("budget: batch.usd") for r in rows if r["status"] == "not_started")
        assert all(items[r["id"]].score(r["answer"]) for r in rows if r["status"] == "ok")
        assert code == 3 and summary["exit_code"] == 3
        assert summary["by_status"]["not_started"] == statuses["not_started"]
        assert summary["cost_usd"] == pytest.approx(spent, rel=1e-6)

    def test_a_rerun_with_a_larger_cap_runs_only_what_was_not_started(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Rerun with a larger cap: `not_started` rows (and any query cut short by the
        batch cap) are replaced by the queries' real rows, finished rows are kept, and the
        output still holds one row per input."""
        items = workloads(12)
        source = write_input(tmp_path / "in.jsonl", items)
        out = tmp_path / "out.jsonl"
        with SimProcess(sim_config(), log_path=tmp_path / "requests.jsonl") as sim:
            assert sim.base_url is not None
            config = write_config(tmp_path / "rlm.toml", sim.base_url)
            assert cli_main(batch_args(source, out, config, "--budget-usd", "0.03", "--json")) == 3
            first = read_rows(out)
            kept = {r["id"] for r in first if r["status"] == "ok"}
            assert kept and len(kept) < len(items)
            sim.wait_until_idle()
            before = len(sim.read_log().entries)
            assert cli_main(batch_args(source, out, config, "--budget-usd", "1", "--json")) == 0
            sim.wait_until_idle()
            sent = len(sim.read_log().entries) - before
        capsys.readouterr()
        rows = read_rows(out)
        assert sorted(r["id"] for r in rows) == sorted(items)
        assert {r["status"] for r in rows} == {"ok"}
        assert sent == sum(r["usage"]["calls"] for r in rows if r["id"] not in kept)


# ============================================================================ crash and Ctrl-C


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "rlm_async.cli", *args]


def wait_for_rows(
    out: Path, n: int, proc: subprocess.Popen[bytes], log: Path, give_up_s: float = 150
) -> None:
    """Poll the output file until it holds `n` complete lines (the process must still run)."""
    give_up = time.monotonic() + give_up_s
    while not out.exists() or out.read_bytes().count(b"\n") < n:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < give_up, f"the batch never wrote {n} rows"
        time.sleep(0.02)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def unaccounted(sim: SimProcess, out: Path) -> float:
    """Dollars the server charged that no row of `out` accounts for (queries running)."""
    in_rows = sum(r["cost_usd"] for r in read_rows_tolerant(out)) if out.exists() else 0.0
    return priced(sim.read_log().entries, PRICES) - in_rows


class TestCrashUnderCap:
    def test_spend_of_queries_cut_off_by_a_crash_counts_against_the_resumed_cap(self, tmp_path: Path) -> None:
        """A capped batch killed with SIGKILL while queries run, then rerun with the same
        cap, output and journal: what the server charged over both runs stays under the
        cap. The rerun replays the cut-off queries' calls for free, and its cap counts
        what they cost in the first run (from the spend log beside the output) as well as
        the finished rows."""
        items = workloads(60)
        source = write_input(tmp_path / "in.jsonl", items)
        out = tmp_path / "out.jsonl"
        cap = 0.25
        with SimProcess(sim_config(chunks=8), log_path=tmp_path / "requests.jsonl") as sim:
            assert sim.base_url is not None
            config = write_config(tmp_path / "rlm.toml", sim.base_url)
            command = cli_command(
                *batch_args(source, out, config, "--budget-usd", str(cap), "--concurrency", "16"),
                "--journal",
                str(tmp_path / "batch.journal"),
            )
            run1_log = tmp_path / "run1.log"
            with run1_log.open("wb") as log1:
                first = subprocess.Popen(command, stdout=log1, stderr=log1, start_new_session=True)
                try:
                    # Kill while the queries that run have been charged more than a resumed
                    # batch leaves unspent under its cap (about $0.02 here): counting only the
                    # finished rows, the rerun would then cross the cap.
                    give_up = time.monotonic() + 120
                    while unaccounted(sim, out) < 0.025:
                        assert first.poll() is None and time.monotonic() < give_up, run1_log.read_text()
                        time.sleep(0.005)
                finally:
                    kill_group(first)
            assert first.returncode == -signal.SIGKILL
            sim.wait_until_idle()
            run1 = sim.read_log().entries
            rows1 = read_rows_tolerant(out)
            in_rows1 = sum(r["cost_usd"] for r in rows1)
            # The kill cut queries off: the server charged more than the finished rows say.
            assert priced(run1, PRICES) > in_rows1 + 1e-9

            second = subprocess.run(command, capture_output=True, text=True, timeout=170)
            sim.wait_until_idle()
            both = sim.read_log().entries
        assert second.returncode == 3, second.stderr  # the cap left queries not started
        rows = read_rows(out)
        assert sorted(r["id"] for r in rows) == sorted(items)
        statuses = Counter(r["status"] for r in rows)
        assert statuses["not_started"] > 0 and set(statuses) == {"ok", "not_started"}
        assert all(items[r["id"]].score(r["answer"]) for r in rows if r["status"] == "ok")
        assert priced(both, PRICES) <= cap
        # The queries cut off by the kill took their paid calls from the journal.
        assert sum(r["usage"]["journal_hits"] for r in rows) > 0


def journal_rows(path: Path) -> int:
    """Rows committed to the journal file (read by another process, as the WAL allows)."""
    if not path.exists():
        return 0
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        try:
            return int(db.execute("SELECT count(*) FROM responses").fetchone()[0])
        except sqlite3.OperationalError:  # the table is not created yet
            return 0


def served_bodies(entries: list[LogEntry]) -> set[str | None]:
    return {e.body_sha256 for e in entries if e.status == 200}


class TestCtrlC:
    def test_a_first_ctrl_c_stops_starting_queries_and_lets_running_ones_finish(self, tmp_path: Path) -> None:
        """Ctrl-C (SIGINT to the batch's process group, as a terminal sends it) once rows
        are being written: no query starts after it, the running ones finish and write
        their rows, the exit code is 130, and every request the server answered belongs to
        a written row. A rerun with the same output and journal finishes the rest and sends
        none of the first run's requests again."""
        items = workloads(60)
        source = write_input(tmp_path / "in.jsonl", items)
        out = tmp_path / "out.jsonl"
        journal = tmp_path / "batch.journal"
        concurrency = 8
        # Each request takes 0.1 s at the server, so queries are mid-flight at the signal.
        latency = LatencyModel(root=KindLatency(ttft_s=0.1), sub=KindLatency(ttft_s=0.1))
        with SimProcess(sim_config(latency=latency), log_path=tmp_path / "requests.jsonl") as sim:
            assert sim.base_url is not None
            config = write_config(tmp_path / "rlm.toml", sim.base_url)
            command = cli_command(
                *batch_args(source, out, config, "--concurrency", str(concurrency), "--json"),
                "--journal",
                str(journal),
            )
            run1_log, run1_out = tmp_path / "run1.log", tmp_path / "run1.json"
            with run1_log.open("wb") as log1, run1_out.open("wb") as stdout1:
                first = subprocess.Popen(command, stdout=stdout1, stderr=log1, start_new_session=True)
                try:
                    wait_for_rows(out, 8, first, run1_log)
                    rows_at_signal = out.read_bytes().count(b"\n")
                    signalled_at = time.monotonic()
                    os.killpg(first.pid, signal.SIGINT)
                    first.wait(timeout=120)
                finally:
                    kill_group(first)
            assert first.returncode == 130, run1_log.read_text()
            sim.wait_until_idle()
            run1 = sim.read_log().entries
            rows1 = read_rows(out)  # every line complete
            # Running queries went on after the signal, and finished: every request the
            # server answered is counted in a row, so no query was left half-done.
            assert any(e.arrival > signalled_at for e in run1)
            assert sum(r["usage"]["calls"] for r in rows1) == len(run1) == len(served_bodies(run1))
            # None started after it: at most the `concurrency` running ones added rows.
            assert rows_at_signal <= len(rows1) <= rows_at_signal + concurrency < len(items)
            assert {r["status"] for r in rows1} == {"ok"}
            summary1 = json.loads(run1_out.read_text())
            assert summary1["interrupted"] is True and summary1["exit_code"] == 130

            second = subprocess.run(command, capture_output=True, text=True, timeout=170)
            assert second.returncode == 0, second.stderr
            run2 = sim.read_log().entries[len(run1) :]
        rows = read_rows(out)
        assert sorted(r["id"] for r in rows) == sorted(items)
        assert all(items[r["id"]].score(r["answer"]) for r in rows)
        assert served_bodies(run1) & {e.body_sha256 for e in run2} == set()

    def test_a_second_ctrl_c_cancels_running_queries_whose_paid_calls_are_all_journaled(
        self, tmp_path: Path
    ) -> None:
        """Two Ctrl-Cs while queries wait on the server: the running queries are cancelled
        (the server sees their requests abandoned), they get no row, the exit code is 130,
        and the journal holds every call the server answered. A rerun against a healthy
        server completes every row, sending none of those calls again."""
        items = workloads(40)
        source = write_input(tmp_path / "in.jsonl", items)
        out = tmp_path / "out.jsonl"
        journal = tmp_path / "batch.journal"
        answered = 40
        # The first 40 requests are answered at once; every later one hangs (10 minutes),
        # so the queries running at the signals are waiting on the server.
        hang = Faults(script=("ok",) * answered, slow=1.0, slow_extra_s=600.0)
        with SimProcess(sim_config(faults=hang), log_path=tmp_path / "requests1.jsonl") as sim:
            assert sim.base_url is not None
            config = write_config(tmp_path / "rlm.toml", sim.base_url)
            command = cli_command(
                *batch_args(source, out, config, "--concurrency", "4"), "--journal", str(journal)
            )
            run1_log = tmp_path / "run1.log"
            with run1_log.open("wb") as log1:
                first = subprocess.Popen(command, stdout=log1, stderr=log1, start_new_session=True)
                try:
                    give_up = time.monotonic() + 120
                    health = sim.base_url.removesuffix("/v1") + "/health"
                    # Every answered call journaled, and a query waiting on a hung request:
                    # the journal's 40th row can come before the next request is sent (the
                    # query's cell runs first), and a query cancelled then sends nothing.
                    while journal_rows(journal) < answered or in_flight(health) == 0:
                        assert first.poll() is None and time.monotonic() < give_up, run1_log.read_text()
                        time.sleep(0.02)
                    rows_at_signal = len(read_rows(out)) if out.exists() else 0
                    os.killpg(first.pid, signal.SIGINT)
                    # A second signal sent before the first was handled would merge with it
                    # (POSIX does not queue them): wait for the batch to say it is stopping.
                    while b"Ctrl-C again to cancel" not in run1_log.read_bytes():
                        assert first.poll() is None and time.monotonic() < give_up, run1_log.read_text()
                        time.sleep(0.02)
                    os.killpg(first.pid, signal.SIGINT)
                    first.wait(timeout=60)
                finally:
                    kill_group(first)
            assert first.returncode == 130, run1_log.read_text()
            sim.wait_until_idle()
            run1 = sim.read_log().entries
        outcomes = Counter(e.outcome for e in run1)
        assert outcomes["ok"] == answered and outcomes["cancelled"] > 0  # abandoned, not answered
        assert journal_rows(journal) == answered
        rows1 = read_rows(out) if out.exists() else []
        # The cancelled queries got no row: the rows are finished queries' (those whose
        # last call was answered before the signals), and fewer than the inputs.
        assert rows_at_signal <= len(rows1) < len(items)
        assert {r["status"] for r in rows1} <= {"ok"}, [r for r in rows1 if r["status"] != "ok"]
        assert sum(r["usage"]["calls"] for r in rows1) <= answered

        with SimProcess(sim_config(), log_path=tmp_path / "requests2.jsonl") as healthy:
            assert healthy.base_url is not None
            config = write_config(tmp_path / "rlm.toml", healthy.base_url)
            second = subprocess.run(command, capture_output=True, text=True, timeout=170)
            assert second.returncode == 0, second.stderr
            healthy.wait_until_idle()
            run2 = healthy.read_log().entries
        rows = read_rows(out)
        assert sorted(r["id"] for r in rows) == sorted(items)
        assert all(items[r["id"]].score(r["answer"]) for r in rows)
        assert served_bodies(run1) & {e.body_sha256 for e in run2} == set()
        assert sum(r["usage"]["journal_hits"] for r in rows) > 0


class TestBadInput:
    def test_bad_lines_become_rows_naming_the_line_and_the_rest_is_answered(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A line that is not JSON, a missing context file, a context file that is not
        UTF-8 and a context over --max-context-chars each get an `invalid` row naming its
        line and the problem; the good lines around them are answered, the server sees
        requests for them only, and the exit code is 1."""
        good = {f"g{i}": s_niah("1k", seed=i) for i in range(3)}
        big = s_niah("4k", seed=9)
        limit = max(len(w.context) for w in good.values()) + 1
        (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
        lines = [
            json.dumps({"id": "g0", "query": good["g0"].query, "context": good["g0"].context}),
            '{"id": "broken", "query": ',
            json.dumps({"id": "gone", "query": "q?", "context_file": "nope.txt"}),
            json.dumps({"id": "g1", "query": good["g1"].query, "context": good["g1"].context}),
            json.dumps({"id": "latin", "query": "q?", "context_file": "latin1.txt"}),
            json.dumps({"id": "big", "query": big.query, "context": big.context}),
            json.dumps({"id": "g2", "query": good["g2"].query, "context": good["g2"].context}),
        ]
        source = tmp_path / "in.jsonl"
        source.write_text("\n".join(lines) + "\n", encoding="utf-8")
        out = tmp_path / "out.jsonl"
        with SimProcess(sim_config(), log_path=tmp_path / "requests.jsonl") as sim:
            assert sim.base_url is not None
            config = write_config(tmp_path / "rlm.toml", sim.base_url)
            code = cli_main(
                batch_args(
                    source, out, config, "--max-context-chars", str(limit), "--json", "--concurrency", "2"
                )
            )
            sim.wait_until_idle()
            log = sim.read_log().entries
        summary = json.loads(capsys.readouterr().out)
        rows = {r["line"]: r for r in read_rows(out)}
        assert sorted(rows) == list(range(1, len(lines) + 1))  # one row per line
        problems = {2: "not valid JSON", 3: "nope.txt", 5: "UTF-8", 6: f"{limit:,}"}
        for line, words in problems.items():
            row = rows[line]
            assert row["status"] == "invalid" and row["error"].startswith(f"line {line}: "), row
            assert words in row["error"], row
        answered = [rows[n] for n in (1, 4, 7)]
        assert all(r["status"] == "ok" and good[r["id"]].score(r["answer"]) for r in answered)
        assert sum(r["usage"]["calls"] for r in answered) == len(log)  # nothing sent for bad lines
        assert code == 1 and summary["exit_code"] == 1 and summary["by_status"] == {"ok": 3, "invalid": 4}
