"""Hedging benchmark: fan-out wall with and without hedged sub-calls, on a latency tail.

    .venv/bin/python benchmarks/hedging.py [--sizes 100,1000] [--pairs 3] [--sigma 0.6]
        [--out benchmarks/results/hedging.json]

The simulator runs in a child process (its own CPU, as in `fanout.py`) with sub-call latency
`0.8 s x exp(sigma z)` (median 0.8 s, a lognormal tail); the engine runs here. One cell,
`llm_batch` over N prompts of about 2,000 characters (a chunk); the sub model echoes, so each
answer is checked. For every pair the same seed serves an unhedged run (A) and a hedged run
(B, `HedgeConfig(enabled=True)`, the defaults), alternating which goes first; the table shows
medians over pairs. Each run has an event loop, so a governor and a hedge book, of its own:
no history from earlier fan-outs, so the `quantile` rule never fires and the stages do all
the hedging (as in a process's first fan-out).

Figures:
* `wall`      the fan-out as the engine saw it: first sub-call start to last sub-call finish
* `ideal`     the same fan-out on an idle, infinitely fast simulator: the largest modeled
              service time (A), or the largest `first arrival -> finish` of the winning copy
              minus its own lag (B); `wall / ideal` shows how much is the machine's lag
* `ratio`     B wall / A wall of the same pair (the target: <= 0.8 at 100, <= 0.65 at 1000)
* `+req`      extra requests the server saw (B / A - 1); `+$` the same for dollars the server
              would bill (prompt and output at $1 / $4 per Mtok; a cancelled copy bills its prompt)
* `A cpu`, `B cpu`  this process's CPU time (user + system, getrusage) per sub-call, ms:
              at sigma = 0 no hedge is sent, so B - A is what hedging costs a call never hedged
* `load`      the 1-minute load average before and after, this machine being shared
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance

from rlm_async import _events
from rlm_async._config import HedgeConfig, ModelConfig, RLMConfig
from rlm_async._governor import EndpointLimits, GovernorConfig, ModelPrice
from rlm_async._rlm import RLM
from rlm_async.sandbox import SandboxConfig
from rlm_async.sim import Faults, KindLatency, LatencyModel, Policies, PolicySpec, SimConfig, SimServer
from rlm_async.sim._log import LogEntry

PRICE = ModelPrice(input_per_mtok=1.0, output_per_mtok=4.0)
CHUNK_CHARS = 2_000


def _code(n: int) -> str:
    return (
        f"prompts = [f'chunk {{i}}: ' + ('lorem ipsum ' * {CHUNK_CHARS // 12}) for i in range({n})]\n"
        "r = llm_batch(prompts)\n"
        "ok = all(a == 'ECHO: ' + p[:200] for a, p in zip(r, prompts))\n"
        "answer['content'] = 'correct' if ok else 'WRONG'\nanswer['ready'] = True"
    )


def _sim_main(config: SimConfig, port_file: str) -> None:
    async def serve() -> None:
        async with SimServer(config) as server:
            await anyio.Path(port_file).write_text(str(server.port))
            await anyio.sleep(10**6)

    anyio.run(serve)


def _sim_config(n: int, sigma: float, seed: int, log_path: str) -> SimConfig:
    return SimConfig(
        seed=seed,
        latency=LatencyModel(sub=KindLatency(ttft_s=0.8, sigma=sigma)),
        faults=Faults(),
        policies=Policies(
            root=PolicySpec(name="fixed", options={"text": f"```repl\n{_code(n)}\n```"}),
            sub=PolicySpec(name="echo"),
        ),
        log_path=log_path,
    )


def _rlm_config(base_url: str, hedge: bool) -> RLMConfig:
    free = ModelPrice.free()
    sub = ModelConfig(
        model="sim-mini",
        base_url=base_url,
        api_key_env=None,
        prices=PRICE,
        max_tokens=200,
        limits=EndpointLimits(max_concurrency=None),
        hedge=HedgeConfig(enabled=hedge),
    )
    root = ModelConfig(model="sim-model", base_url=base_url, api_key_env=None, prices=free)
    return RLMConfig(
        root=root,
        sub=sub,
        sandbox=SandboxConfig(cell_timeout_s=600),
        governor=GovernorConfig(chars_per_token=4.0),
    )


async def _run_once(base_url: str, hedge: bool) -> dict[str, Any]:
    starts: list[float] = []
    ends: list[float] = []
    hedges = 0

    def sink(e: _events.Event) -> None:
        nonlocal hedges
        if isinstance(e, _events.CallStart) and e.call_kind == "sub":
            starts.append(e.time)
        elif isinstance(e, _events.CallFinish) and e.depth == 1:
            ends.append(e.time)
        elif isinstance(e, _events.CallHedge):
            hedges += 1

    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    async with RLM(config=_rlm_config(base_url, hedge), event_sinks=[sink]) as rlm:
        result = await rlm.acompletion("ctx", "q")
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {
        "engine_cpu_s": cpu_s,
        "wall_s": max(ends) - min(starts),
        "answer": result.response,
        "hedges_sent_events": hedges,
        "hedges_won": sum(1 for r in result.calls if r.hedge is not None and r.hedge.won),
        "engine_cost_usd": result.total.cost_usd,
    }


def _server_view(entries: list[LogEntry]) -> dict[str, Any]:
    subs = [e for e in entries if e.kind == "sub"]
    billed = sum(e.prompt_tokens * 1.0 + e.completion_tokens * 4.0 for e in subs) / 1e6
    lags = [(e.finish - (e.start or e.arrival)) - (e.modeled_s or 0.0) for e in subs if e.outcome == "ok"]
    return {
        "requests": len(subs),
        "cancelled": sum(e.outcome == "cancelled" for e in subs),
        "billed_usd": billed,
        "max_modeled_s": max((e.modeled_s or 0.0) for e in subs),
        "sim_lag_mean_ms": 1e3 * statistics.fmean(lags) if lags else 0.0,
        "sim_lag_max_ms": 1e3 * max(lags) if lags else 0.0,
    }


def _one(n: int, sigma: float, seed: int, hedge: bool, workdir: Path) -> dict[str, Any]:
    log_path = workdir / f"log-{n}-{seed}-{int(hedge)}.jsonl"
    port_file = workdir / f"port-{n}-{seed}-{int(hedge)}"
    log_path.unlink(missing_ok=True)
    port_file.unlink(missing_ok=True)
    proc = multiprocessing.get_context("spawn").Process(
        target=_sim_main, args=(_sim_config(n, sigma, seed, str(log_path)), str(port_file)), daemon=True
    )
    proc.start()
    try:
        for _ in range(600):
            if port_file.exists() and port_file.read_text():
                break
            time.sleep(0.05)
        base_url = f"http://127.0.0.1:{port_file.read_text()}/v1"
        run = anyio.run(_run_once, base_url, hedge)
        time.sleep(0.5)  # the server logs a cancelled copy when it notices the disconnect
        entries = [LogEntry.from_dict(json.loads(line)) for line in log_path.read_text().splitlines()]
    finally:
        proc.terminate()
        proc.join(5)
    return {**run, **_server_view(entries), "n": n, "seed": seed, "hedge": hedge}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--sigma", type=float, default=0.6)
    parser.add_argument("--out", default="benchmarks/results/hedging.json")
    args = parser.parse_args(argv)
    workdir = Path("/tmp/rlm-hedging-bench")
    workdir.mkdir(exist_ok=True)
    load_before = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for n in (int(s) for s in args.sizes.split(",")):
        pairs = []
        for p in range(args.pairs):
            seed = 1000 * n + p
            order = (False, True) if p % 2 == 0 else (True, False)
            got = {h: _one(n, args.sigma, seed, h, workdir) for h in order}
            runs.extend(got.values())
            a, b = got[False], got[True]
            pairs.append(
                {
                    "ratio": b["wall_s"] / a["wall_s"],
                    "extra_req": b["requests"] / a["requests"] - 1,
                    "extra_usd": b["billed_usd"] / a["billed_usd"] - 1,
                    "a_wall": a["wall_s"],
                    "b_wall": b["wall_s"],
                    "a_ideal": a["max_modeled_s"],
                    "a_cpu_ms": 1e3 * a["engine_cpu_s"] / n,
                    "b_cpu_ms": 1e3 * b["engine_cpu_s"] / n,
                    "correct": a["answer"] == b["answer"] == "correct",
                    "lag_ms": max(a["sim_lag_mean_ms"], b["sim_lag_mean_ms"]),
                }
            )
            print(
                f"  n={n} pair {p}: "
                + ", ".join(
                    f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in pairs[-1].items()
                ),
                flush=True,
            )
        med = {k: statistics.median(float(p[k]) for p in pairs) for k in pairs[0] if k != "correct"}
        rows.append({"n": n, "sigma": args.sigma, **med, "all_correct": all(p["correct"] for p in pairs)})
    load_after = os.getloadavg()[0]
    print(
        f"\nsigma={args.sigma}, medians of {args.pairs} A/B pairs; load {load_before:.1f} -> {load_after:.1f}"
    )
    print(
        f"{'n':>6} {'A wall':>8} {'A ideal':>8} {'B wall':>8} {'ratio':>6} {'+req':>6} {'+$':>6} {'lag ms':>7} {'A cpu':>6} {'B cpu':>6} correct"
    )
    for r in rows:
        print(
            f"{r['n']:>6} {r['a_wall']:>8.2f} {r['a_ideal']:>8.2f} {r['b_wall']:>8.2f} {r['ratio']:>6.2f} "
            f"{100 * r['extra_req']:>5.1f}% {100 * r['extra_usd']:>5.1f}% {r['lag_ms']:>7.0f} {r['a_cpu_ms']:>6.2f} {r['b_cpu_ms']:>6.2f} {r['all_correct']}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    key = f"sigma={args.sigma}"
    previous[key] = {
        "provenance": provenance("hedging.py", argv, load_before=load_before, load_after=load_after),
        "rows": rows,
        "runs": runs,
    }
    out.write_text(json.dumps(previous, indent=1) + "\n")


if __name__ == "__main__":
    main()
