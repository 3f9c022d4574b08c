"""The command line, run as a real subprocess: answers, JSON, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SIM_TOML = REPO / "configs" / "sim.toml"


def cli(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI")}
    return subprocess.run(
        [sys.executable, "-m", "rlm_async.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **(env or {})},
        input=stdin,
        cwd=REPO,
    )


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The process failed with exit 2 and exactly one error line, no traceback. (Structured
    log lines, such as a price warning, may precede it: they are JSON, not the error.)"""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("rlm-async: ")
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture
def context_file(tmp_path: Path) -> Path:
    lines = [f"Date: Jan 1 || User: {i} || Instance: How far is the moon from the earth?" for i in range(50)]
    path = tmp_path / "ctx.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


class TestRun:
    def test_answers_on_the_simulator_with_json(self, context_file: Path) -> None:
        """`run --config configs/sim.toml --json` answers offline and prints the result as JSON."""
        proc = cli(
            "run",
            "--config",
            str(SIM_TOML),
            "--context",
            str(context_file),
            "--query",
            "How many records are there?",
            "--json",
        )
        assert proc.returncode in (0, 1), proc.stderr
        result = json.loads(proc.stdout)
        assert result["status"] in ("ok", "max_iterations")
        assert result["total"]["calls"] >= 2
        assert result["usage_summary"]["model_usage_summaries"]

    def test_reads_the_context_from_stdin(self) -> None:
        """`--context -` reads standard input."""
        proc = cli(
            "run",
            "--config",
            str(SIM_TOML),
            "--context",
            "-",
            "--query",
            "What is here?",
            "--json",
            stdin="a short context\n",
        )
        assert proc.returncode in (0, 1), proc.stderr
        assert json.loads(proc.stdout)["total"]["calls"] >= 1


class TestBadInput:
    def test_missing_context_file(self, tmp_path: Path) -> None:
        """A missing context file names the path and what to pass instead."""
        line = one_line_error(cli("run", "--context", str(tmp_path / "nope.txt"), "--query", "q"))
        assert "does not exist" in line and "nope.txt" in line

    def test_missing_api_key(self, context_file: Path) -> None:
        """No OPENAI_API_KEY: the error names the variable to set, before any request."""
        line = one_line_error(cli("run", "--context", str(context_file), "--query", "q"))
        assert "OPENAI_API_KEY" in line

    def test_unsupported_context_type(self, tmp_path: Path) -> None:
        """A JSON context that is not a list, dict or string is refused with the fix."""
        path = tmp_path / "n.json"
        path.write_text("42")
        line = one_line_error(cli("run", "--config", str(SIM_TOML), "--context", str(path), "--query", "q"))
        assert "JSON int" in line

    def test_unknown_model(self, tmp_path: Path, context_file: Path) -> None:
        """A model the server does not serve: one line with the 404 and where to list models."""
        toml = tmp_path / "bad.toml"
        toml.write_text('[root]\nmodel = "nope"\nbase_url = "sim"\napi_key_env = ""\n[sim]\nseed = 0\n')
        line = one_line_error(
            cli("run", "--config", str(toml), "--context", str(context_file), "--query", "q")
        )
        assert "404" in line and "'nope'" in line and "/models" in line

    def test_unreachable_endpoint(self, tmp_path: Path, context_file: Path) -> None:
        """Nothing listening at base_url: one line naming the URL and what to check."""
        toml = tmp_path / "down.toml"
        toml.write_text(
            '[root]\nmodel = "m"\nbase_url = "http://127.0.0.1:9/v1"\napi_key_env = ""\n'
            "[governor.retry]\nmax_attempts = 1\n"
        )
        line = one_line_error(
            cli("run", "--config", str(toml), "--context", str(context_file), "--query", "q")
        )
        assert "cannot reach http://127.0.0.1:9/v1" in line and "base_url" in line

    def test_unknown_config_key(self, tmp_path: Path, context_file: Path) -> None:
        """A typo in a config file is named, with the valid keys."""
        toml = tmp_path / "typo.toml"
        toml.write_text('[root]\nmodel = "m"\nbase_ulr = "x"\n')
        line = one_line_error(
            cli("run", "--config", str(toml), "--context", str(context_file), "--query", "q")
        )
        assert "base_ulr" in line and "valid keys" in line

    @pytest.mark.parametrize(
        ("command", "port", "said"),
        [
            ("serve", "99999", "from 0 to 65535 (0 picks a free one), not 99999"),
            ("serve", "-1", "from 0 to 65535 (0 picks a free one), not -1"),
            ("sim", "http", "'http' is not a port: use a whole number from 0 to 65535"),
        ],
    )
    def test_a_port_out_of_range_is_a_usage_error(self, command: str, port: str, said: str) -> None:
        """`--port` out of range or not a number: argparse's usage error naming the range,
        before anything starts (the socket's own refusal was an unexpected OverflowError)."""
        proc = cli(command, "--port", port)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert f"rlm-async {command}: error: argument --port: " in proc.stderr and said in proc.stderr

    def test_a_port_out_of_range_in_the_config_names_its_table(self, tmp_path: Path) -> None:
        toml = tmp_path / "serve.toml"
        toml.write_text("[serve]\nport = 70000\n" + SIM_TOML.read_text())
        line = one_line_error(cli("serve", "--config", str(toml)))
        assert "[serve] port must be a whole number from 0 to 65535" in line and "70000" in line

    def test_trace_view_of_something_that_is_not_a_trace(self, tmp_path: Path) -> None:
        """A missing path, a directory, a file that is not a trace: one line each, naming it
        (they were unexpected FileNotFoundError, IsADirectoryError and ValueError)."""
        missing = one_line_error(cli("trace", "view", str(tmp_path / "q1.jsonl")))
        assert "q1.jsonl does not exist" in missing and "--trace DIR" in missing
        directory = one_line_error(cli("trace", "view", str(tmp_path)))
        assert "is a directory" in directory and "DIR/<query_id>.jsonl" in directory
        other = tmp_path / "notes.jsonl"
        other.write_text("not a trace\n")
        line = one_line_error(cli("trace", "view", str(other)))
        assert "notes.jsonl is not an rlm_async trace" in line

    def test_a_trace_directory_that_cannot_be_used_stops_the_run_before_it_starts(
        self, tmp_path: Path, context_file: Path
    ) -> None:
        """`--trace` naming a file: one configuration error, and no answer (the run, and
        its model calls, never started)."""
        a_file = tmp_path / "trace.jsonl"
        a_file.write_text("")
        proc = cli(
            "run",
            "--config",
            str(SIM_TOML),
            "--context",
            str(context_file),
            "--query",
            "q",
            "--trace",
            str(a_file),
        )
        line = one_line_error(proc)
        assert "cannot write traces to" in line and "it is a file; traces go in a directory" in line
        assert proc.stdout == ""

    def test_a_batch_output_in_a_missing_directory(self, tmp_path: Path) -> None:
        source = tmp_path / "in.jsonl"
        source.write_text('{"id": 1, "query": "q", "context": "c"}\n')
        out = tmp_path / "missing" / "out.jsonl"
        line = one_line_error(cli("batch", str(source), "--out", str(out), "--config", str(SIM_TOML)))
        assert f"the directory {out.parent} does not exist; create it first" in line

    @pytest.mark.parametrize(
        ("option", "value", "said"),
        [
            ("--chunks", "0", "chunks is 0; the demo fans out to at least 1 chunk"),
            (
                "--tokens",
                "lots",
                "tokens: not a size: 'lots' (use e.g. 8k, 128k, 1m, 10m or a number of tokens)",
            ),
            ("--tokens", "0", "tokens is '0'; the demo's context needs at least 1 token"),
        ],
    )
    def test_demo_sizes_it_cannot_run(self, option: str, value: str, said: str) -> None:
        """Named in one line before the simulator starts (a chunk count of 0 was the
        simulator process's traceback inside an unexpected RuntimeError)."""
        line = one_line_error(cli("demo", option, value, "--json"))
        assert line.startswith(f"rlm-async: configuration error: {said}")

    def test_doctor_with_no_config_and_no_key_points_at_the_simulator(self) -> None:
        """With no --config, doctor checks OpenAI's defaults; without a key it says which
        variable to set and how to check the bundled simulator or the sandbox instead."""
        line = one_line_error(cli("doctor"))
        assert "OPENAI_API_KEY" in line
        assert "`rlm-async doctor --config configs/sim.toml`" in line and "`--sandbox`" in line

    def test_debug_shows_the_traceback_and_keeps_the_exit_code(self, tmp_path: Path) -> None:
        """--debug adds the traceback; the one line and exit 2 stay as without it."""
        proc = cli("--debug", "run", "--context", str(tmp_path / "nope.txt"), "--query", "q")
        assert proc.returncode == 2 and "Traceback" in proc.stderr
        assert proc.stderr.rstrip().splitlines()[-1].startswith("rlm-async: error: context file")


class TestArguments:
    def test_version(self) -> None:
        """--version prints the package version and exits 0."""
        import rlm_async

        proc = cli("--version")
        assert proc.returncode == 0 and proc.stdout.strip() == f"rlm-async {rlm_async.__version__}"

    def test_sim_help_lists_its_options(self) -> None:
        """`rlm-async sim --help` is the simulator's own help, and says it is not a model."""
        proc = cli("sim", "--help")
        assert proc.returncode == 0, proc.stderr
        assert "--port" in proc.stdout and "--latency" in proc.stdout and "not a model" in proc.stdout

    def test_sim_takes_the_readme_arguments(self) -> None:
        """`rlm-async sim --port P --latency realistic` serves on P (the README's command)."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with subprocess.Popen(
            [sys.executable, "-m", "rlm_async.cli", "sim", "--port", str(port), "--latency", "realistic"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
        ) as proc:
            try:
                assert proc.stdout is not None
                line = proc.stdout.readline()
                assert f"http://127.0.0.1:{port}/v1" in line, line
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
                    assert "sim-model" in r.read().decode()
            finally:
                proc.terminate()
                proc.wait(timeout=20)


class TestSimulatorHonesty:
    def test_a_question_the_simulator_cannot_answer_says_so(self, context_file: Path) -> None:
        """configs/sim.toml's own example query over ordinary text: the answer opens with
        the simulator's "cannot answer" marker and the CLI says it is not an answer."""
        from rlm_async.sim import NOT_AN_ANSWER

        proc = cli(
            "run", "--config", str(SIM_TOML), "--context", str(context_file),
            "--query", "How many lines mention invoices?", "--quiet",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(NOT_AN_ANSWER)
        assert "this is NOT an answer" in proc.stderr

    def test_a_workload_question_is_answered_and_labelled(self, tmp_path: Path) -> None:
        """A question the simulator does answer (a synthetic workload's) carries no marker,
        but the CLI still says the simulator answered, not a model."""
        from rlm_async.sim import NOT_AN_ANSWER
        from rlm_async.workloads import oolong_counting

        w = oolong_counting("16k", seed=1)
        ctx = tmp_path / "w.txt"
        ctx.write_text(str(w.context))
        proc = cli("run", "--config", str(SIM_TOML), "--context", str(ctx), "--query", w.query, "--quiet")
        assert proc.returncode == 0, proc.stderr
        assert NOT_AN_ANSWER not in proc.stdout and w.score(proc.stdout.strip())
        assert "answered by the bundled simulator" in proc.stderr


class TestJournal:
    def test_the_shipped_sim_config_pays_nothing_twice(self, context_file: Path, tmp_path: Path) -> None:
        """The same `run --config configs/sim.toml --journal J` twice: the in-process simulator
        listens on a new random port each time, yet the second run takes every call from the
        journal (the key is what was asked, not where it was sent)."""
        argv = (
            "run",
            "--config",
            str(SIM_TOML),
            "--context",
            str(context_file),
            "--query",
            "How many records?",
        )
        journal = ("--journal", str(tmp_path / "run.journal"), "--json")
        first = json.loads(cli(*argv, *journal).stdout)["total"]
        second = json.loads(cli(*argv, *journal).stdout)["total"]
        assert first["journal_hits"] == 0 and first["calls"] >= 2
        assert second["journal_hits"] == second["calls"] == first["calls"]
        assert second["cost_usd"] == 0.0


class TestDemoAndTrace:
    def test_the_demo_and_the_timeline_name_their_two_numbers_apart(self, tmp_path: Path) -> None:
        """The terminal's number is the simulator's lower bound, the timeline's the measured
        critical path: two numbers, two names."""
        proc = cli("demo", "--tokens", "32k", "--chunks", "4", "--quiet", "--trace", str(tmp_path))
        assert proc.returncode == 0, proc.stderr
        assert "lower bound" in proc.stdout and "critical" not in proc.stdout
        out = tmp_path / "run.html"
        assert cli("trace", "view", str(next(tmp_path.glob("*.jsonl"))), "-o", str(out)).returncode == 0
        html = out.read_text()
        assert "measured critical path" in html and "lower bound" not in html

    def test_small_demo_is_right_and_writes_a_trace(self, tmp_path: Path) -> None:
        """The demo answers correctly (exit 0), and its trace renders to one HTML file."""
        proc = cli("demo", "--tokens", "32k", "--chunks", "8", "--json", "--trace", str(tmp_path))
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["correct"] is True and report["requests"] >= 10
        trace = next(tmp_path.glob("*.jsonl"))
        out = tmp_path / "run.html"
        view = cli("trace", "view", str(trace), "-o", str(out))
        assert view.returncode == 0, view.stderr
        assert out.read_text().lower().startswith("<!doctype html>")
