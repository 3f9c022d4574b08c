"""Ray cluster benchmark: the figures of docs/scale.md, measured on a local cluster.

    .venv/bin/python benchmarks/ray_cluster.py [--queries 300] [--actors 2] [--concurrency 8]
                                               [--out benchmarks/results/ray_cluster.json]

Starts the same loopback cluster as tests/test_e2e_ray.py (a head and two worker nodes,
each `ray start --block` in its own process group, one CPU each) and the simulator in a
process of its own with the same per-model limits, runs `rlm-async batch --ray` on
`--queries` needle/counting queries, and reports:

* round trips per query to the coordinators (rate leases), the budget keeper and the
  journal store, counted by the actors, plus the one `run_item` call that carries a query;
* lease sizes: the mean grant per (model, requests|tokens) and the paced share of each limit;
* per actor: queries, wall seconds, queries per second, CPU seconds per query (the actor
  process' user + system time, REPL workers not included);
* the server's busiest 10-second window per model against the limit's 10 seconds' worth.

Needs the ray extra (`.ci/install-ray`). The machine's load average is recorded: on a
shared machine, wall-clock figures move with it; CPU per query much less.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _provenance import provenance

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _ray_cluster import RayCluster
from test_e2e_ray import (
    LIMITS,
    PRICES,
    WINDOW_S,
    busiest_windows,
    read_rows,
    sim_config,
    workloads,
    write_config,
    write_input,
)

from rlm_async.sim import SimProcess, priced


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--budget-usd", type=float, default=5.0)
    parser.add_argument("--out", default="benchmarks/results/ray_cluster.json")
    parser.add_argument(
        "--kill-worker-at", type=float, help="kill -9 worker node 0 once this share of rows is written"
    )
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="rlm-ray-bench-"))
    items = workloads(args.queries)
    source = write_input(tmp / "in.jsonl", items)
    out = tmp / "out.jsonl"
    load_before = os.getloadavg()
    with RayCluster(workers=2) as cluster, SimProcess(sim_config(), log_path=tmp / "requests.jsonl") as sim:
        assert sim.base_url is not None
        config = write_config(tmp / "rlm.toml", sim.base_url)
        started = time.monotonic()
        driver = subprocess.Popen(
            [
                sys.executable, "-m", "rlm_async.cli", "batch", str(source), "--out", str(out),
                "--config", str(config), "--quiet", "--json", "--concurrency", str(args.concurrency),
                "--budget-usd", str(args.budget_usd), "--ray", cluster.address,
                "--ray-actors", str(args.actors), "--ray-resources", json.dumps({cluster.worker_resource: 1}),
            ],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        killed_at_rows = None
        if args.kill_worker_at is not None:
            while not out.exists() or out.read_bytes().count(b"\n") < args.kill_worker_at * args.queries:
                if driver.poll() is not None:
                    break
                time.sleep(0.05)
            killed_at_rows = out.read_bytes().count(b"\n") if out.exists() else 0
            cluster.kill_worker(0)
        stdout, stderr = driver.communicate(timeout=1800)
        done = subprocess.CompletedProcess(driver.args, driver.returncode, stdout, stderr)
        wall = time.monotonic() - started
        sim.wait_until_idle()
        log = sim.read_log().entries
    if done.returncode != 0:
        raise SystemExit(f"the batch failed ({done.returncode}): {done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    figures = summary.pop("ray")
    rows = read_rows(out)
    queries = len(rows)
    actors = figures["actors"]
    trips = {
        "rate_leases": sum(a["rate_round_trips"] for a in actors),
        "budget": sum(a["budget_round_trips"] for a in actors),
        "journal_store": sum(a["store_round_trips"] for a in actors),
        "run_item": queries,
    }
    windows = busiest_windows(log)
    result: dict[str, Any] = {
        **provenance("ray_cluster.py", load_average_before=load_before, load_average_after=os.getloadavg()),
        "queries": queries,
        "correct": sum(1 for r in rows if items[r["id"]].score(r["answer"])),
        "requests": len(log),
        "wall_s": round(wall, 1),
        "round_trips": trips,
        "round_trips_per_query": {k: round(v / queries, 3) for k, v in trips.items()},
        "round_trips_per_query_total": round(sum(trips.values()) / queries, 3),
        "subcalls_per_query": round(len(log) / queries, 2),
        "leases": figures["coordinators"],
        "budget": figures["budget"],
        "journal_store": figures["store"],
        "actors": [
            {
                **a,
                "queries_per_s": round(a["queries"] / a["wall_s"], 3) if a["wall_s"] else None,
                "cpu_ms_per_query": round(1000 * a["cpu_s"] / a["queries"], 1) if a["queries"] else None,
            }
            for a in actors
        ],
        "busiest_window": {
            m: {
                "window_s": WINDOW_S,
                "requests": r,
                "requests_allowed": LIMITS[m][0] * WINDOW_S / 60,
                "tokens": t,
                "tokens_allowed": LIMITS[m][1] * WINDOW_S / 60,
            }
            for m, (r, t) in windows.items()
        },
        "server_spend_usd": round(priced(log, PRICES), 6),
        "killed_worker_at_rows": killed_at_rows,
        "actor_deaths": figures["actor_deaths"],
        "requeued": figures["requeued"],
        "completed_requests": len([e for e in log if e.status == 200]),
        "sent_again_same_body": sum(
            n - 1 for n in Counter(e.body_sha256 for e in log if e.model is not None).values() if n > 1
        ),
        # What the server completed beyond the calls the rows needed: paid twice.
        "paid_twice": len([e for e in log if e.status == 200])
        - sum(r["usage"]["calls"] - r["usage"]["failed_calls"] for r in rows),
        "replayed_from_store": sum(a["seeded_rows"] for a in actors),
        "summary": summary,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("queries", "correct", "wall_s", "round_trips_per_query", "busiest_window")
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
