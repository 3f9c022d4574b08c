"""Batch benchmark: many small RLM queries through `RLM.abatch` under a requests-per-minute
limit. Does the batch keep the limit busy, and what does the engine spend per query?

    .venv/bin/python benchmarks/batch.py [--queries 1000] [--rpm 900] [--concurrency 64]
                                         [--out benchmarks/results/batch.json] [--quick]
                                         [--log requests.jsonl]

The server is `rlm_async.sim` in a child process (`SimProcess`: real HTTP on loopback) with
OpenAI's limiter semantics: a bucket of `rpm` requests refilling continuously, 429 with
`retry-after` beyond it. Each query is a needle search over a 2k-token context that the
simulated root model answers in three requests (peek, one `llm_query` fan-out of one chunk,
final) with the stand-in latencies of the simulator's defaults (none: the server answers
at once, so the limit and the engine are all that is measured). Root and sub-calls use one
model, so the governor's one RPM bucket and the server's are the same budget. The governor
is told the limit (`EndpointLimits(requests_per_minute=rpm)`).

Reported, from the server's request log and this process' resource usage:

* `RPM share`: the sustained rate as a share of the limit. A bucket that is full at the
  first request admits at most `C + r*T` in the `T` seconds up to the last admitted request
  (capacity C = rpm, refill r = rpm/60), so the share is `(admitted - C) / (r*T)`
  (target >= 95%). The run must outlast the first minute's burst for this to mean anything:
  `--queries` x 3 requests should exceed `rpm` by a good margin.
* `bucket full s`: the seconds, between the first and the last admitted request, during
  which the server's bucket sat full, so its refill was thrown away (replayed from the
  server's log). This is the whole shortfall: `share = 1 - bucket_full_s / T` up to the
  last few requests. A client that sends the first minute's burst slowly loses nothing as
  long as it sends faster than the refill rate; it loses exactly while it sends slower than
  that with a full bucket (a stall at the start, when every query is starting its worker).
* `after burst`: the rate from the request that spent the first minute's burst (number
  `rpm`) to the last one, as a share of `rpm/60` per second. Above 100% when the burst went
  out slower than it could have (the refill banked meanwhile is spent after it): a reading
  of the burst's speed, not a second target.
* `429s`: requests the server refused.
* `engine CPU / query`: this process' CPU time (user + system, all threads) over the batch,
  divided by the queries; `worker CPU / query`: the same for the REPL worker processes
  (children reaped during the batch).
* `correct`: answers that match the workload's truth.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from _provenance import provenance

from rlm_async import RLM, EndpointLimits, GovernorConfig, ModelConfig, ModelPrice, RLMConfig, SandboxConfig
from rlm_async.sim import Policies, PolicySpec, RateLimits, SimConfig, SimProcess
from rlm_async.sim._log import RequestLog
from rlm_async.workloads import s_niah

PRICE = ModelPrice(input_per_mtok=0.25, cached_input_per_mtok=0.025, output_per_mtok=2.0)


def _isolation() -> str:
    import shutil

    return "bwrap" if shutil.which("bwrap") else "none"


def sustained_share(admitted: int, capacity: int, period_s: float) -> float | None:
    if admitted <= capacity or period_s <= 0:
        return None
    return (admitted - capacity) / (capacity / 60.0 * period_s)


def bucket_full_s(arrivals: list[float], capacity: int) -> float:
    """Seconds the server's bucket (full at the first request, refilled at capacity/60 a
    second, one token per admitted request) spent full between admitted requests."""
    rate = capacity / 60.0
    level, last, full = float(capacity), arrivals[0], 0.0
    for t in arrivals:
        gap = t - last
        to_full = (capacity - level) / rate
        if gap > to_full:
            full += gap - to_full
        level = min(float(capacity), level + gap * rate) - 1
        last = t
    return full


def cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


async def run(
    queries: int, rpm: int, concurrency: int, seed: int, log_path: Path | None = None
) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    works = [s_niah("2k", seed=seed + i) for i in range(queries)]
    items = [{"id": i, "query": w.query, "context": w.context} for i, w in enumerate(works)]
    sim_config = SimConfig(
        seed=seed,
        models=("sim-model",),
        rate_limits=RateLimits(rpm=rpm),
        policies=Policies(root=PolicySpec(name="rlm", options={"chunks": 1})),
    )
    async with SimProcess(sim_config, log_path=log_path) as sim:
        assert sim.base_url is not None
        model = ModelConfig(
            model="sim-model",
            base_url=sim.base_url,
            api_key_env=None,
            max_tokens=1024,  # the simulated root writes about 600 tokens of code
            prices=PRICE,
            limits=EndpointLimits(max_concurrency=256, requests_per_minute=rpm),
        )
        config = RLMConfig(
            root=model,
            max_iterations=6,
            governor=GovernorConfig(chars_per_token=4.0),
            sandbox=SandboxConfig(isolation=_isolation()),  # type: ignore[arg-type]
        )
        correct = 0
        statuses: dict[str, int] = {}
        cpu_self, cpu_children, wall = (
            cpu(resource.RUSAGE_SELF),
            cpu(resource.RUSAGE_CHILDREN),
            time.perf_counter(),
        )
        async with RLM(config=config) as rlm:
            async for row in rlm.abatch(items, concurrency=concurrency):
                statuses[row.status] = statuses.get(row.status, 0) + 1
                assert isinstance(row.id, int)
                correct += works[row.id].score(row.answer)
        wall = time.perf_counter() - wall
        cpu_self = cpu(resource.RUSAGE_SELF) - cpu_self
        cpu_children = cpu(resource.RUSAGE_CHILDREN) - cpu_children
        log: RequestLog = sim.read_log()
    entries = log.by_arrival()
    admitted = [e for e in entries if e.status != 429]
    period = max(e.arrival for e in admitted) - entries[0].arrival
    share = sustained_share(len(admitted), rpm, period)
    # Once the first minute's burst (rpm requests) is spent, the limit binds: the rate from
    # then to the last request, against the refill rate.
    after = admitted[rpm:] if len(admitted) > rpm + 1 else []
    steady = (
        (len(after) - 1) / (after[-1].arrival - after[0].arrival) / (rpm / 60.0)
        if after and after[-1].arrival > after[0].arrival
        else None
    )
    return {
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "queries": queries,
        "rpm": rpm,
        "concurrency": concurrency,
        "requests": len(entries),
        "rate_limited": sum(1 for e in entries if e.status == 429),
        "rpm_share": None if share is None else round(share, 4),
        "rpm_share_after_burst": None if steady is None else round(steady, 4),
        "bucket_full_s": round(bucket_full_s([e.arrival for e in admitted], rpm), 2),
        "wall_s": round(wall, 2),
        "queries_per_s": round(queries / wall, 2),
        "engine_cpu_ms_per_query": round(1000 * cpu_self / queries, 2),
        "worker_cpu_ms_per_query": round(1000 * cpu_children / queries, 2),
        "correct": correct,
        "statuses": statuses,
    }


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rpm", type=int, default=900)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke test: 60 queries at 600 RPM")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--log", type=Path, default=None, help="keep the server's request log (JSONL) here")
    args = parser.parse_args(argv)
    queries, rpm = (60, 600) if args.quick else (args.queries, args.rpm)
    r = await run(queries, rpm, args.concurrency, args.seed, args.log)
    share = "-" if r["rpm_share"] is None else f"{r['rpm_share']:.1%}"
    steady = "-" if r["rpm_share_after_burst"] is None else f"{r['rpm_share_after_burst']:.1%}"
    print(
        f"{'queries':>7} {'RPM':>6} {'conc':>5} {'reqs':>6} {'429s':>5} {'RPM %':>7} {'full s':>6} {'after burst':>11} {'wall s':>7} "
        f"{'q/s':>6} {'engine ms/q':>11} {'worker ms/q':>11} {'correct':>7}"
    )
    print(
        f"{r['queries']:>7} {r['rpm']:>6} {r['concurrency']:>5} {r['requests']:>6} {r['rate_limited']:>5} "
        f"{share:>7} {r['bucket_full_s']:>6} {steady:>11} {r['wall_s']:>7} {r['queries_per_s']:>6} {r['engine_cpu_ms_per_query']:>11} "
        f"{r['worker_cpu_ms_per_query']:>11} {r['correct']:>7}"
    )
    print(f"load average (1 min) before / after: {r['load_avg_1m'][0]} / {r['load_avg_1m'][1]}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        data = {**provenance("batch.py", argv), "result": r}
        args.out.write_text(json.dumps(data, indent=2) + "\n")
    return 0 if r["correct"] == r["queries"] else 1


if __name__ == "__main__":
    sys.exit(anyio.run(main, sys.argv[1:]))
