"""Many queries at once in one process: how close N concurrent `acompletion` calls come to
the wall time of one query alone, and where the extra time goes.

    .venv/bin/python benchmarks/concurrency.py [--queries 1,20,100] [--tokens 100K] [--chunks 20]
        [--repeat 1] [--max-workers 32,none] [--pool 0,100] [--separate-scans]
        [--out benchmarks/results/concurrency.json] [--label NAME]

Each query is COUNT (OOLONG-like counting) over its own seeded context of `--tokens`
simulator tokens, fanned out to `--chunks` sub-calls, all on one shared `RLM` (one engine,
one governor, one connection pool set), against the simulator in a child process with the
demo's latencies (root 0.4 s + 4 ms/token, sub 0.3 s + 4 ms/token, 10 % jitter). The figure
the issue asks for is `ratio` = wall of N at once / wall of 1 alone (target <= 1.2 at 100).

Where the time goes, per query (means over the N queries, from the engine's own events on
one clock, and the simulator's log):

* `start s`    REPL worker start-up, context loading included (`worker.start` duration_s)
* `1st call s` query start -> the first root call is sent (start-up + prompt building)
* `root s`     root calls as the engine saw them (governor wait + HTTP + server)
* `fan-out s`  first sub-call sent -> last sub-call back, per fan-out, summed
* `cells s`    REPL cells (their sub-calls included) minus the fan-outs: the worker's own
               work and the control channel
* `gov wait s` time queued in the governor's limiters (all calls, summed per query)
* `sim lag s`  per request: the server's finish - start minus the latency it drew (its
               own CPU share), mean
* `cpu ms/q`   CPU of the engine process over the batch / N (workload generation excluded)

* `slot wait s` waiting for a slot under `RLMConfig.max_workers` (`worker.slot` events)

`--max-workers` and `--pool` take comma lists; every combination runs in turn within each
repeat (A/B alternated, so each sees the same machine load), and the table gives each
combination's median. `--separate-scans` is the A/B switch for the sandbox's /proc scans:
each kill and each worker start reads /proc itself, as before concurrent scans shared one pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from _provenance import provenance

from rlm_async import _events
from rlm_async._rlm import RLM
from rlm_async.demo import DEMO_LATENCY, demo_config, sim_config
from rlm_async.sim import SimProcess
from rlm_async.workloads import oolong_counting, parse_size

RESULTS = Path(__file__).parent / "results"


class _Collector:
    """Events of one query, by kind, with the engine clock's times."""

    def __init__(self) -> None:
        self.events: list[_events.Event] = []

    def __call__(self, event: _events.Event) -> None:
        if event.kind in (
            "query.start",
            "query.finish",
            "worker.start",
            "call.start",
            "call.finish",
            "cell.start",
            "cell.finish",
            "limiter.wait",
            "worker.slot",
        ):
            self.events.append(event)

    def breakdown(self) -> dict[str, float]:
        ev = self.events
        t0 = next(e.time for e in ev if e.kind == "query.start")
        t1 = next(e.time for e in ev if e.kind == "query.finish")
        start = sum(e.payload().get("duration_s", 0.0) for e in ev if e.kind == "worker.start")
        kinds: dict[str, str] = {}
        starts: dict[str, float] = {}
        root = 0.0
        first_call = None
        sub_spans: list[tuple[float, float]] = []
        for e in ev:
            if e.kind == "call.start":
                cid = e.payload()["call_id"]
                kinds[cid] = e.payload()["call_kind"]
                starts[cid] = e.time
                if first_call is None:
                    first_call = e.time
            elif e.kind == "call.finish":
                cid = e.payload()["call_id"]
                if kinds.get(cid) in ("root", "final"):
                    root += e.time - starts[cid]
                elif cid in starts:
                    sub_spans.append((starts[cid], e.time))
        cells = 0.0
        fanout = 0.0
        cell_start: float | None = None
        for e in ev:
            if e.kind == "cell.start":
                cell_start = e.time
            elif e.kind == "cell.finish" and cell_start is not None:
                inside = [s for s in sub_spans if cell_start <= s[0] <= e.time]
                span = (max(f for _, f in inside) - min(s for s, _ in inside)) if inside else 0.0
                fanout += span
                cells += (e.time - cell_start) - span
                cell_start = None
        waited = sum(e.payload().get("waited_s", 0.0) for e in ev if e.kind == "limiter.wait")
        slot = sum(e.payload().get("waited_s", 0.0) for e in ev if e.kind == "worker.slot")
        return {
            "wall_s": t1 - t0,
            "slot_wait_s": slot,
            "start_s": start,
            "first_call_s": (first_call - t0) if first_call is not None else 0.0,
            "root_s": root,
            "fanout_s": fanout,
            "cells_s": cells,
            "gov_wait_s": waited,
        }


async def _batch(
    base_url: str, n: int, tokens: int, seed0: int, max_workers: int | None = 32, pool: int = 0
) -> dict[str, Any]:
    workloads = [oolong_counting(tokens, seed=seed0 + i) for i in range(n)]
    config = dataclasses.replace(demo_config(base_url), max_workers=max_workers, worker_pool=pool)
    collectors = [_Collector() for _ in range(n)]
    results: list[Any] = [None] * n
    async with RLM(config=config) as rlm:
        if rlm.worker_pool is not None:
            await rlm.worker_pool.wait_full()  # pre-started before the queries arrive

        async def one(i: int) -> None:
            w = workloads[i]
            results[i] = await rlm.acompletion(w.context, w.query, event_sinks=[collectors[i]])

        cpu0, t0 = time.process_time(), time.monotonic()
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
        wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    correct = sum(1 for w, r in zip(workloads, results, strict=True) if w.score(r.response or ""))
    parts = [c.breakdown() for c in collectors]
    mean = {k: statistics.fmean(p[k] for p in parts) for k in parts[0]}
    return {
        "n": n,
        "wall_s": wall,
        "query_wall_mean_s": mean["wall_s"],
        "query_wall_max_s": max(p["wall_s"] for p in parts),
        "correct": correct,
        "statuses": sorted({r.status for r in results}),
        "engine_cpu_s": cpu,
        "cpu_ms_per_query": 1000 * cpu / n,
        "means": mean,
        "calls": sum(r.total.calls for r in results),
    }


def _sim_lags(log: Any, since: float) -> dict[str, float]:
    entries = [e for e in log if e.arrival >= since and e.start is not None and e.modeled_s is not None]
    if not entries:
        return {"sim_lag_s": 0.0, "requests": 0}
    return {
        "sim_lag_s": statistics.fmean((e.finish - e.start) - e.modeled_s for e in entries),
        "sim_queue_s": statistics.fmean(e.queue_s for e in entries),
        "requests": len(entries),
    }


def _row(label: str, r: dict[str, Any], base: float | None) -> str:
    m = r["means"]
    ratio = f"{r['wall_s'] / base:.2f}" if base else "-"
    return (
        f"| {label} | {r['n']} | {r['correct']}/{r['n']} | {r['wall_s']:.2f} | {ratio} | "
        f"{m['slot_wait_s']:.3f} | {m['start_s']:.3f} | {m['first_call_s']:.3f} | {m['root_s']:.2f} | {m['fanout_s']:.2f} | "
        f"{m['cells_s']:.3f} | {m['gov_wait_s']:.3f} | "
        f"{r.get('sim_lag_s', 0.0):.3f} | {r['cpu_ms_per_query']:.0f} |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", default="1,20,100")
    p.add_argument("--tokens", default="100K")
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--label", default="", help="names this configuration in the JSON and the table")
    p.add_argument(
        "--separate-scans",
        action="store_true",
        help="A/B: every /proc scan of the sandbox reads /proc itself (as before the shared scan)",
    )
    p.add_argument(
        "--max-workers",
        default="32",
        help="RLMConfig.max_workers values to alternate, e.g. 32,none ('none': no cap on live workers)",
    )
    p.add_argument(
        "--pool",
        default="0",
        help="RLMConfig.worker_pool sizes to alternate, e.g. 0,100 (0: workers start on demand)",
    )
    p.add_argument("--out", default=str(RESULTS / "concurrency.json"))
    args = p.parse_args(argv)
    if args.separate_scans:
        from rlm_async.sandbox import _procs

        _procs.scan = _procs._scan_now
    sizes = [int(x) for x in args.queries.split(",")]
    pools = [int(x) for x in args.pool.split(",")]
    caps = [None if x == "none" else int(x) for x in args.max_workers.split(",")]
    configs = [(cap, pool) for cap in caps for pool in pools]
    tokens = parse_size(args.tokens)
    label = args.label or ("separate /proc scans" if args.separate_scans else "shared /proc scan")
    runs: list[dict[str, Any]] = []
    with SimProcess(sim_config(args.chunks, latency=DEMO_LATENCY)) as sim:
        assert sim.base_url is not None
        for rep in range(args.repeat):
            for n in sizes:
                for cap, pool in configs:  # A/B alternated, so each sees the same machine load
                    load0 = os.getloadavg()[0]
                    since = time.monotonic()
                    r = anyio.run(_batch, sim.base_url, n, tokens, 1000 * rep, cap, pool)
                    sim.wait_until_idle()
                    r.update(_sim_lags(sim.read_log(), since))
                    r["repeat"] = rep
                    r["loadavg_before"] = load0
                    r["label"] = label
                    r["pool"] = pool
                    r["max_workers"] = cap
                    runs.append(r)
                    print(
                        f"  {label} max_workers={cap} pool={pool} n={n} rep={rep}: wall {r['wall_s']:.2f} s, "
                        f"correct {r['correct']}/{n}, load {load0:.1f}",
                        file=sys.stderr,
                    )
    print(
        "| config | N | correct | wall s | ratio | slot wait s | start s | 1st call s | root s | fan-out s "
        "| cells s | gov wait s | sim lag s | cpu ms/q |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cap, pool in configs:
        mine_all = [r for r in runs if r["pool"] == pool and r["max_workers"] == cap]
        alone = [r["wall_s"] for r in mine_all if r["n"] == 1]
        base_wall = statistics.median(alone) if alone else None
        for n in sizes:
            mine = sorted((r for r in mine_all if r["n"] == n), key=lambda r: r["wall_s"])
            print(_row(f"max_workers {cap}, pool {pool}", mine[len(mine) // 2], base_wall))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    configs = existing.get("configs", {})
    configs[label] = {
        **provenance("concurrency.py", argv, loadavg=os.getloadavg()),
        "tokens": tokens,
        "chunks": args.chunks,
        "runs": runs,
    }
    out.write_text(json.dumps({"configs": configs}, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
