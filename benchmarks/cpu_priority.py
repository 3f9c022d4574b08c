"""Cells that never stop computing: what workers at a lower CPU priority buy the other queries.

    .venv/bin/python benchmarks/cpu_priority.py [--spinners 4] [--queries 60] [--repeat 3]
        [--nice 0,19] [--out benchmarks/results/cpu_priority.json]

One engine (`RLM`, the demo's configuration; the simulator in a child process with the
demo's latencies), N queries at once (COUNT over 100K tokens each, 20 sub-calls each),
first alone and then while K more workers each run a cell that computes without end
(`while True: pass`, as broken or hostile code does until its cell's deadline), for each
`SandboxConfig.nice` in `--nice`, which every worker gets (the queries' own and the
spinners'). The values alternate within each repeat, so each sees the same machine.

Figures per run: the N queries' wall alone and beside the spinners, their ratio, and the
engine process's CPU over the batch. The summary gives medians over the repeats per nice
value. Where the kernel schedules each session as a group (`autogroup`, printed), a
spinner's session weighs as much as the engine's whole process unless it is lowered too;
elsewhere (a container's cgroup) the workers' own nice value is what counts.
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

from rlm_async._rlm import RLM
from rlm_async.demo import DEMO_LATENCY, demo_config, sim_config
from rlm_async.sandbox import WorkerRequest, start_worker
from rlm_async.sandbox._priority import autogroup_on
from rlm_async.sim import SimProcess
from rlm_async.workloads import oolong_counting, parse_size

RESULTS = Path(__file__).parent / "results"
SPIN = "while True:\n    pass"


async def _refuse(request: WorkerRequest) -> list[str]:
    raise AssertionError("a spinner asked for a sub-call")


async def _batch(base_url: str, n: int, tokens: int, seed0: int, nice: int, spinners: int) -> dict[str, Any]:
    workloads = [oolong_counting(tokens, seed=seed0 + i) for i in range(n)]
    base = demo_config(base_url)
    config = dataclasses.replace(base, sandbox=dataclasses.replace(base.sandbox, nice=nice))
    spin_config = dataclasses.replace(config.sandbox, cell_timeout_s=None)
    results: list[Any] = [None] * n
    async with RLM(config=config) as rlm, anyio.create_task_group() as spinning:
        workers = [await start_worker("", spin_config) for _ in range(spinners)]
        try:
            for w in workers:
                spinning.start_soon(w.run_cell, SPIN, _refuse)
            await anyio.sleep(0.5 if spinners else 0)  # spinning before the first query

            async def one(i: int) -> None:
                w = workloads[i]
                results[i] = await rlm.acompletion(w.context, w.query)

            cpu0, t0 = time.process_time(), time.monotonic()
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(one, i)
            wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
        finally:
            spinning.cancel_scope.cancel()
            with anyio.CancelScope(shield=True):
                for w in workers:
                    await w.aclose()
    correct = sum(1 for w, r in zip(workloads, results, strict=True) if w.score(r.response or ""))
    return {"wall_s": wall, "engine_cpu_s": cpu, "correct": correct, "n": n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spinners", type=int, default=4)
    p.add_argument("--queries", type=int, default=60)
    p.add_argument("--tokens", default="100K")
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--nice", default="0,19", help="SandboxConfig.nice values to alternate")
    p.add_argument("--out", default=str(RESULTS / "cpu_priority.json"))
    args = p.parse_args(argv)
    nices = [int(x) for x in args.nice.split(",")]
    tokens = parse_size(args.tokens)
    runs: list[dict[str, Any]] = []
    print(f"autogroup on: {autogroup_on()}; {os.cpu_count()} cores", file=sys.stderr)
    with SimProcess(sim_config(args.chunks, latency=DEMO_LATENCY)) as sim:
        assert sim.base_url is not None
        for rep in range(args.repeat):
            for nice in nices:
                row: dict[str, Any] = {"repeat": rep, "nice": nice, "loadavg_before": os.getloadavg()[0]}
                for key, k in (("alone", 0), ("spinning", args.spinners)):
                    row[key] = anyio.run(_batch, sim.base_url, args.queries, tokens, 1000 * rep, nice, k)
                    sim.wait_until_idle()
                row["ratio"] = row["spinning"]["wall_s"] / row["alone"]["wall_s"]
                runs.append(row)
                print(
                    f"  nice={nice} rep={rep}: alone {row['alone']['wall_s']:.2f} s, beside "
                    f"{args.spinners} spinners {row['spinning']['wall_s']:.2f} s (x{row['ratio']:.2f}), "
                    f"correct {row['alone']['correct']}+{row['spinning']['correct']}/{2 * args.queries}",
                    file=sys.stderr,
                )
    print(
        "| nice | queries | spinners | runs | alone s | beside the spinners s | ratio | engine CPU s (beside) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for nice in nices:
        mine = [r for r in runs if r["nice"] == nice]
        med = statistics.median
        print(
            f"| {nice} | {args.queries} | {args.spinners} | {len(mine)} "
            f"| {med(r['alone']['wall_s'] for r in mine):.2f} | {med(r['spinning']['wall_s'] for r in mine):.2f} "
            f"| {med(r['ratio'] for r in mine):.2f} | {med(r['spinning']['engine_cpu_s'] for r in mine):.2f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        **provenance("cpu_priority.py", argv, loadavg=os.getloadavg()),
        "autogroup": autogroup_on(),
        "queries": args.queries,
        "spinners": args.spinners,
        "tokens": tokens,
        "chunks": args.chunks,
        "runs": runs,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    wrong = sum(2 * args.queries - r["alone"]["correct"] - r["spinning"]["correct"] for r in runs)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
