"""What the prefix-cache warm-up costs in time: a benchmark, not a test module.

    .venv/bin/python tests/_bench_warmup.py [--reps 5] [--chunks 1000] [--sub-latency demo|2.0]

Runs the same 1000-chunk counting query with the planner's default rule (it warms such a
batch: one sub-call first, the other 999 once it finished) and with warming off, alternating,
against the simulator in a process of its own. Prints JSON: per mode the medians of the
run's wall time and of its fan-out phase as the server saw it (from the finish of the root
turn that fanned out to the last sub-call's finish), the warm-up request's own latency, and
the cost per run priced from the server's log. The claim it checks: warming costs at most
one sub-call's latency, i.e. `warm - cold` of the fan-out phase is about the warm-up's
latency. Timings depend on the machine and its load; run it on an idle one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import sandbox_config

from rlm_async._rlm import RLM
from rlm_async.demo import DEMO_LATENCY, DEMO_PRICES, demo_config
from rlm_async.sim import KindLatency, LatencyModel, Policies, PolicySpec, SimConfig, SimProcess
from rlm_async.workloads import oolong_counting


def one_run(*, warm: bool, chunks: int, latency: LatencyModel) -> dict[str, Any]:
    workload = oolong_counting("100k", seed=3)
    sim = SimConfig(
        latency=latency, policies=Policies(root=PolicySpec(name="rlm", options={"chunks": chunks}))
    )
    with SimProcess(sim) as server:
        assert server.base_url is not None
        # demo_config: CacheSettings() (warm when it pays), or CacheSettings(warm=False).
        config = dataclasses.replace(demo_config(server.base_url, cache=warm), sandbox=sandbox_config())

        async def go() -> Any:
            async with RLM(config=config) as rlm:
                return await rlm.acompletion(workload.context, workload.query)

        result = anyio.run(go)
    log = server.read_log().entries
    subs = sorted((e for e in log if e.kind == "sub"), key=lambda e: e.arrival)
    roots = sorted((e for e in log if e.kind == "root"), key=lambda e: e.arrival)
    fanned_out = max(r.finish for r in roots if r.finish <= subs[0].arrival)
    cost = 0.0
    for e in log:
        assert e.model is not None
        p = DEMO_PRICES[e.model]
        assert p.cached_input_per_mtok is not None
        cost += (
            (e.prompt_tokens - e.cached_tokens) * p.input_per_mtok
            + e.cached_tokens * p.cached_input_per_mtok
            + e.completion_tokens * p.output_per_mtok
        ) / 1e6
    return {
        "correct": workload.score(result.response),
        "wall_s": result.execution_time,
        "fanout_s": max(e.finish for e in subs) - fanned_out,
        "first_sub_latency_s": subs[0].finish - subs[0].arrival,
        "sub_latency_median_s": statistics.median(e.finish - e.arrival for e in subs),
        "cached_subs": sum(1 for e in subs if e.cached_tokens > 0),
        "cost_usd": cost,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=1000)
    parser.add_argument("--sub-latency", default="demo", help="'demo' (DEMO_LATENCY) or seconds")
    args = parser.parse_args()
    if args.sub_latency == "demo":
        latency = DEMO_LATENCY
    else:
        latency = LatencyModel(root=KindLatency(ttft_s=0.01), sub=KindLatency(ttft_s=float(args.sub_latency)))
    runs: dict[str, list[dict[str, Any]]] = {"warm": [], "cold": []}
    for _ in range(args.reps):
        for mode in ("warm", "cold"):
            runs[mode].append(one_run(warm=mode == "warm", chunks=args.chunks, latency=latency))

    def med(mode: str, key: str) -> float:
        return float(statistics.median(float(r[key]) for r in runs[mode]))

    report = {
        "chunks": args.chunks,
        "reps": args.reps,
        "sub_latency": args.sub_latency,
        "all_correct": all(r["correct"] for rs in runs.values() for r in rs),
        **{
            mode: {
                k: round(med(mode, k), 4)
                for k in (
                    "wall_s",
                    "fanout_s",
                    "first_sub_latency_s",
                    "sub_latency_median_s",
                    "cached_subs",
                    "cost_usd",
                )
            }
            for mode in runs
        },
        "warm_minus_cold_fanout_s": round(med("warm", "fanout_s") - med("cold", "fanout_s"), 4),
        "warm_minus_cold_wall_s": round(med("warm", "wall_s") - med("cold", "wall_s"), 4),
        "warmup_latency_s": round(med("warm", "first_sub_latency_s"), 4),
        "runs": runs,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
