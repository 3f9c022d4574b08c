"""Batches on a Ray cluster, end to end: a head and two worker nodes started with `ray
start` as separate processes on loopback, the simulator in a process of its own logging
every request, and `rlm-async batch --ray ADDRESS` as the driver. Every check is on what
the server observed (requests and tokens per window, dollars at the configured prices)
and on the output rows; no test asserts a duration.

Ray is the `ray` extra. Without it the module skips, naming the install command — except
in CI (`CI=true`), where a missing install fails instead (`.ci/install-ray`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest
from _batch_config import PRICES, read_rows, sim_config, workloads, write_config, write_input
from _ray_cluster import RayCluster

from rlm_async.ray._local import AUTH_ENV
from rlm_async.sim import LogEntry, RateLimits, SimProcess, priced
from rlm_async.workloads import Workload

IN_CI = os.environ.get("CI", "").lower() == "true"
MISSING = None if importlib.util.find_spec("ray") is not None else "ray is not installed"
if MISSING and not IN_CI:
    pytest.skip(
        f'Ray cluster tests need the ray extra ({MISSING}); run .ci/install-ray or pip install -e ".[dev,ray]"',
        allow_module_level=True,
    )

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

# The cluster's limits (client side, per model); the simulator enforces their sum.
LIMITS = {"sim-model": (600, 1_500_000), "sim-mini": (1500, 1_500_000)}
WINDOW_S = 10.0
CLUSTER_RATE = RateLimits(rpm=sum(r for r, _ in LIMITS.values()), tpm=sum(t for _, t in LIMITS.values()))


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    if MISSING:  # only in CI: there it must run, never skip
        pytest.fail(f"CI=true but Ray is not installed ({MISSING}); .ci/run must call .ci/install-ray")
    with RayCluster(workers=2) as c:  # stopped on the way out, failure or not
        yield c


def command(source: Path, out: Path, config: Path, cluster: RayCluster, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rlm_async.cli",
        "batch",
        str(source),
        "--out",
        str(out),
        "--config",
        str(config),
        "--quiet",
        "--json",
        "--concurrency",
        "8",
        "--ray",
        cluster.address,
        "--ray-actors",
        "2",
        "--ray-resources",
        json.dumps({cluster.worker_resource: 1}),
        *extra,
    ]


def busiest_windows(entries: list[LogEntry]) -> dict[str, tuple[int, int]]:
    """Per model: the most requests, and the most tokens (prompt + max_tokens, as the
    server's TPM meter counts them), that arrived in any `WINDOW_S`-second window."""
    out: dict[str, tuple[int, int]] = {}
    by_model: dict[str, list[LogEntry]] = defaultdict(list)
    for e in entries:
        if e.model is not None:
            by_model[e.model].append(e)
    for model, es in by_model.items():
        es.sort(key=lambda e: e.arrival)
        most_req = most_tok = 0
        j = tok = 0
        for i, e in enumerate(es):
            tok += e.prompt_tokens + (e.max_tokens or 0)
            while es[j].arrival <= e.arrival - WINDOW_S:
                tok -= es[j].prompt_tokens + (es[j].max_tokens or 0)
                j += 1
            most_req = max(most_req, i - j + 1)
            most_tok = max(most_tok, tok)
        out[model] = (most_req, most_tok)
    return out


class ClusterBatch(NamedTuple):
    """A Ray batch's files and the rate-limited simulator it runs against."""

    sim: SimProcess
    source: Path
    out: Path
    config: Path


@contextmanager
def cluster_batch(tmp_path: Path, items: dict[str, Workload]) -> Iterator[ClusterBatch]:
    """`items` written as the batch's input, and a simulator with the cluster's rate limits
    (its log in `tmp_path`), configured for the batch; the simulator stops on leaving."""
    source = write_input(tmp_path / "in.jsonl", items)
    with SimProcess(
        sim_config(chunks=2, rate_limits=CLUSTER_RATE), log_path=tmp_path / "requests.jsonl"
    ) as sim:
        assert sim.base_url is not None
        config = write_config(tmp_path / "rlm.toml", sim.base_url, limits=LIMITS, server="off")
        yield ClusterBatch(sim, source, tmp_path / "out.jsonl", config)


def run_capped(
    cluster: RayCluster, tmp_path: Path, items: dict[str, Workload], cap: float, *, timeout: float
) -> tuple[subprocess.CompletedProcess[str], list[LogEntry], Path]:
    """Run `items` as a Ray batch under a dollar cap against a rate-limited simulator: the
    finished command, the server's log, and the output file."""
    with cluster_batch(tmp_path, items) as (sim, source, out, config):
        done = subprocess.run(
            command(source, out, config, cluster, "--budget-usd", str(cap)),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        sim.wait_until_idle()
        log = sim.read_log().entries
    return done, log, out


class TestClusterBatch:
    def test_300_queries_every_row_right_within_rate_limits_and_cap(
        self, cluster: RayCluster, tmp_path: Path
    ) -> None:
        """300 queries on two worker nodes: every input has exactly one row and the right
        answer; per model, no 10-second window of the server's log holds more requests or
        tokens than the configured per-minute limits allow in 10 seconds; and what the
        server charged stays within the batch's dollar cap."""
        items = workloads(300)
        cap = 5.0  # about $0.01 a query: room for all 300, so every row must be "ok"
        done, log, out = run_capped(cluster, tmp_path, items, cap, timeout=780)
        assert done.returncode == 0, (done.stdout[:400], done.stderr[-3000:])
        summary = json.loads(done.stdout)
        rows = read_rows(out)
        assert sorted(r["id"] for r in rows) == sorted(items)
        assert [r["id"] for r in rows if not items[r["id"]].score(r["answer"])] == []
        assert summary["by_status"] == {"ok": 300}
        # Both worker nodes ran queries, and the coordinators paced real leases.
        ray_figures = summary["ray"]
        assert len({a["node"] for a in ray_figures["actors"]}) == 2
        assert sum(a["queries"] for a in ray_figures["actors"]) == 300
        for model, (most_req, most_tok) in busiest_windows(log).items():
            rpm, tpm = LIMITS[model]
            assert most_req <= rpm * WINDOW_S / 60, (model, most_req)
            assert most_tok <= tpm * WINDOW_S / 60, (model, most_tok)
        assert Counter(e.outcome for e in log)["rate_limited"] == 0
        spent = priced(log, PRICES)
        assert 0 < spent <= cap
        assert summary["cost_usd"] == pytest.approx(spent, rel=1e-6)
        assert ray_figures["budget"]["grants"] > 0

    def test_a_cap_below_what_the_batch_needs_is_never_crossed(
        self, cluster: RayCluster, tmp_path: Path
    ) -> None:
        """60 queries under a cap of about a third of what they need, leased to two actors
        in blocks: what the server charged stays within the cap, the queries the budget
        could not cover get `not_started` rows naming it, and the exit code is 3."""
        items = workloads(60)
        cap = 0.2
        done, log, out = run_capped(cluster, tmp_path, items, cap, timeout=600)
        assert done.returncode == 3, (done.stdout[:400], done.stderr[-3000:])
        rows = read_rows(out)
        assert sorted(r["id"] for r in rows) == sorted(items)
        statuses = Counter(r["status"] for r in rows)
        assert statuses["ok"] > 0 and statuses["not_started"] > 0, statuses
        assert all(r["error"].startswith("budget: batch.usd") for r in rows if r["status"] == "not_started")
        assert all(items[r["id"]].score(r["answer"]) for r in rows if r["status"] == "ok")
        assert 0 < priced(log, PRICES) <= cap


class TestNodeDeath:
    def test_a_worker_node_killed_mid_run_loses_nothing_and_pays_little_twice(
        self, cluster: RayCluster, tmp_path: Path
    ) -> None:
        """A worker node's raylet process group killed with SIGKILL once a third of the
        rows are written: its queries finish on the other node, every input has exactly one
        row and the right answer, and at most 2% of the requests the server completed are
        sent again (same request body)."""
        items = workloads(150)
        with cluster_batch(tmp_path, items) as (sim, source, out, config):
            with (tmp_path / "driver.log").open("w") as driver_log:
                driver = subprocess.Popen(
                    command(source, out, config, cluster),
                    stdout=subprocess.PIPE,
                    stderr=driver_log,
                    text=True,
                )
                try:
                    give_up = time.monotonic() + 400
                    while not out.exists() or out.read_bytes().count(b"\n") < len(items) // 3:
                        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
                        assert time.monotonic() < give_up, "the batch never got a third of the way"
                        time.sleep(0.05)
                    hosts = cluster.workers_running("ray::QueryActor")
                    assert hosts, "no worker node runs a query actor"
                    cluster.kill_worker(hosts[0])
                    stdout, _ = driver.communicate(timeout=600)
                finally:
                    if driver.poll() is None:
                        driver.kill()
                        driver.wait()
                    if driver.stdout is not None:  # on a failure above, before communicate()
                        driver.stdout.close()
            sim.wait_until_idle()
            log = sim.read_log().entries
        assert driver.returncode == 0, (tmp_path / "driver.log").read_text()[-3000:]
        summary = json.loads(stdout)
        rows = read_rows(out)
        assert sorted(r["id"] for r in rows) == sorted(items)  # one row each, none twice
        assert [r["id"] for r in rows if not items[r["id"]].score(r["answer"])] == []
        assert summary["ray"]["actor_deaths"] >= 1 and summary["ray"]["requeued"] >= 1
        completed = [e for e in log if e.status == 200]
        sent = Counter(e.body_sha256 for e in log if e.model is not None)
        same_body_twice = sum(n - 1 for n in sent.values() if n > 1)
        # Every call a row needed was paid once (or replayed free); what the server completed
        # beyond that was paid twice, whether or not its body matched the first copy.
        needed = sum(r["usage"]["calls"] - r["usage"]["failed_calls"] for r in rows)
        paid_twice = len(completed) - needed
        assert 0 <= paid_twice <= 0.02 * len(completed), (paid_twice, len(completed))
        assert same_body_twice <= paid_twice
        # The re-run queries replayed what their dead actor had journaled.
        assert sum(a["seeded_rows"] for a in summary["ray"]["actors"]) > 0


class TestLocalRay:
    def test_a_local_ray_answers_and_leaves_no_token_in_home(self, tmp_path: Path) -> None:
        """`--ray local` starts a one-machine Ray (never joining another one), answers every
        query, and writes no ~/.ray/auth_token: such a file would turn token auth on for
        every later `ray start` cluster on the machine, which then refuses drivers that
        join by address."""
        if MISSING:  # only in CI: there it must run, never skip
            pytest.fail(f"CI=true but Ray is not installed ({MISSING}); .ci/run must call .ci/install-ray")
        items = workloads(6)
        source = write_input(tmp_path / "in.jsonl", items)
        out = tmp_path / "out.jsonl"
        home = tmp_path / "home"
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in AUTH_ENV and k != "RAY_ADDRESS"}
        env |= {"HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
        with SimProcess(sim_config(chunks=2), log_path=tmp_path / "requests.jsonl") as sim:
            assert sim.base_url is not None
            config = write_config(tmp_path / "rlm.toml", sim.base_url, server="off")
            argv = [sys.executable, "-m", "rlm_async.cli", "batch", str(source), "--out", str(out)]
            argv += ["--config", str(config), "--quiet", "--json", "--ray", "local", "--ray-actors", "1"]
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (done.stdout[:400], done.stderr[-3000:])
        rows = read_rows(out)
        assert sorted(r["id"] for r in rows) == sorted(items)
        assert all(items[r["id"]].score(r["answer"]) for r in rows)
        assert not (home / ".ray").exists()
