"""The load test's machinery, small: `benchmarks/serve_load.py` with locust (headless,
loopback, bounded) runs 8 concurrent queries through a live server with a worker pool, with
no error, every answer right, every worker taken from the pool, and says where their time
went (from the server's traces and the simulator's log). The ratio is printed by the benchmark, not asserted here: walls on a shared
machine are not a test's business."""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BENCH = Path(__file__).parents[1] / "benchmarks"


def _serve_load() -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("serve_load", BENCH / "serve_load.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_locust_load_runs_clean() -> None:
    """8 users at once, one query each: 8 answered, all right, no error, locust exit 0, and
    all nine workers (the query alone's and the eight) pre-started."""
    module = _serve_load()
    with tempfile.TemporaryDirectory() as tmp:
        result = module.run(8, 8_000, 4, 120, Path(tmp), pool=8)
    assert result["errors"] == 0, result
    assert result["correct"] == 8 and result["single_correct"], result
    assert result["locust_exit"] == 0, result["locust_stderr_tail"]
    # The server used its pool: the query alone and the eight took pre-started workers.
    assert result["pooled_workers"] == 9 and result["pool_misses"] == 0, result
    # Where the time went: every query's trace was read (the answer names it), each with
    # its two root turns and one fan-out of 4, and the CPU of the server and the
    # simulator's process was seen.
    assert result["pieces_traced"] == 8, result
    burst = result["pieces_burst_median"]
    assert burst["root_turns"] == 2 and burst["fanout_bound_s"] > 0, burst
    assert result["pieces_alone"]["root_turns"] == 2
    # The last query to finish (the one that sets the aggregate wall) is broken down too:
    # it ran within the aggregate wall (the two are read from different clocks: 10 ms slack).
    last = result["pieces_burst_last"]
    assert last["root_turns"] == 2 and 0 < last["client_wall_s"] <= result["aggregate_wall_s"] + 0.01, last
    assert 0 <= result["client_send_spread_s"] <= result["aggregate_wall_s"], result
    assert result["cpu_burst"]["cpu_s"]["server"] > 0 and result["cpu_burst"]["cpu_s"]["simulator"] > 0
    assert result["simulator"]["sub"]["requests"] == 8 * 4, result["simulator"]


def test_untraced_the_server_writes_no_traces_and_gives_no_breakdown() -> None:
    """`--no-trace`: the server as deployed, no trace directory, every answer right."""
    module = _serve_load()
    with tempfile.TemporaryDirectory() as tmp:
        result = module.run(4, 8_000, 2, 120, Path(tmp), pool=4, trace=False)
        assert not (Path(tmp) / "traces").exists()
    assert result["errors"] == 0 and result["correct"] == 4, result
    assert result["server_traced"] is False and result["pieces_traced"] == 0
    assert result["pieces_burst_median"] is None and result["pieces_alone"] is None
    # The server's own figures over the burst, read from /metrics before and after it: the
    # loop-lag probe woke during it, and the collector's counters moved or not, never back.
    lag, gc_burst = result["loop_lag_burst"], result["gc_burst"]
    assert lag["wakeups"] > 0 and 0 <= lag["late_over_50ms"] <= lag["late_over_10ms"] <= lag["wakeups"], lag
    assert gc_burst["full_collections"] >= 0 and gc_burst["all_collections_s"] >= 0, gc_burst
    assert result["scrape_after_last_answer_s"] >= 0, result


def test_profile_summary_sums_py_spy_stacks_by_function(tmp_path: Path) -> None:
    """py-spy's raw lines (frames root first, a count last) summed: inclusive and self."""
    raw = tmp_path / "server-pool1-1.txt"
    raw.write_text(
        "main (a/cli.py:1);run (a/engine.py:5);send (a/transport.py:9) 3\n"
        "main (a/cli.py:1);run (a/engine.py:5) 1\n"
    )
    summary = _serve_load().profile_summary(raw)
    assert "4 samples" in summary
    inclusive, own = summary.split("self:")
    assert "100.0% cli.py:main" in inclusive and "100.0% engine.py:run" in inclusive
    assert " 75.0% transport.py:send" in own and " 25.0% engine.py:run" in own
