"""Caching benchmark: what the prefix-cache warm-up and the response journal save, in tokens,
dollars and time, on a 1000-chunk counting run against the simulator.

    .venv/bin/python benchmarks/caching.py [--reps 5] [--latency demo,slow-sub]
                                            [--out benchmarks/results/caching.json]

    # about 3.5 min on 2 shared cores with the defaults

The query: an OOLONG-like counting question (`rlm_async.workloads.oolong_counting("100k",
seed=3)`) whose scripted root model splits the context into 1000 chunks and fans out one
`llm_batch` of 1000 sub-calls. Each sub-call prompt is the sub system prompt and the
instructions (1,402 simulator tokens, the same for all) followed by a chunk of about 100-150
tokens, so the shared prefix is most of every prompt. Models and prices are the demo's
(`rlm_async.demo.demo_config`, `DEMO_PRICES`: stand-ins, not any provider's). The server is
`rlm_async.sim` in a child process of its own (prefix caching with OpenAI's semantics:
1,024+ tokens, 128-token steps, an entry usable once the request that wrote it finished);
the engine runs in another child process (this file with `--one`), so a run can be killed
without taking the measurement down. Every run gets a fresh server (a cold cache), except
the resumed run, which meets the server the killed run used, as a resume a few minutes
later would meet a provider's cache.

1. Prefix caching: warm-up on vs warming off. `demo_config(cache=True)` (the planner's
   default rule, which warms a 1000-call batch: one sub-call first, the other 999 once it
   finished) against `demo_config(cache=False)` (`CacheSettings(warm=False)`: all 1000 at
   once), alternating, `--reps` times each; the table shows medians. Two latency settings
   (`--latency`), both with no capacity limit at the server:

   * `demo`: `DEMO_LATENCY`, sub-call 0.3 s time to first token + 1e-5 s per uncached
     prompt token + 0.004 s per output token, jitter 10%; root turns the same from 0.4 s.
     A sub-call (~0.33 s) is shorter than it takes the engine to send and the simulator to
     take in 1000 requests on a busy 2-core machine, so even a batch sent at once is partly
     served from the cache its first requests wrote: "warming off" is not "all miss" here,
     and how much of it hits varies with the machine's load.
   * `slow-sub`: the same with a 2 s sub-call time to first token, longer than sending the
     batch takes: with warming off, every request is in flight before the first finishes.

   Figures:

   * `prefix cached`: of the sub-calls' shared-prefix tokens (the longest common start of
     the sent sub-call prompts as the simulator serialises them, 4 characters a token), the
     share the server reported cached, `sum(min(cached, prefix)) / (calls x prefix)`. A
     warm-up's best is (N-1)/N of the prefix rounded down to 128-token steps.
   * `depth-1 hit ratio`: cached / all prompt tokens of the depth-1 calls (the result's
     `by_depth[1].cache_hit_ratio`).
   * `$`: the run's dollars (the result's `total.cost_usd`; the server log priced the same
     way is in the JSON as `cost_from_log_usd`).
   * `wall`: `acompletion`'s `execution_time`. `fan-out`: from the finish of the root turn
     that asked for the batch to the last sub-call's finish, on the server's clock.
   * `warm-up latency`: the first sub-call's latency at the server (arrival to finish), when
     it went alone; `warm-up finish -> next sub-call sent`: from its finish to the next
     sub-call's arrival (the engine releasing the rest of the batch; a batch sent at once
     spends about as long reaching the server); `sub-call latency`: the median over the
     run's sub-calls (arrival to finish, the simulator's queueing included). The claim
     checked: the warm-up costs at most one sub-call's latency, i.e. the fan-out with
     warm-up on is longer than with warming off by about the warm-up's latency, no more
     (`warm - off fan-out`: median of the per-repeat differences).

2. Resume savings: the response journal after a crash. Both models at `temperature=0.0`
   (the journal reuses only deterministic calls). Latency: `DEMO_LATENCY` with the sub
   model's capacity at the server limited to 50 requests at a time (the rest queue), so the
   fan-out takes several seconds and a kill can land at half of it. Runs:

   * `fresh`: a run with a new journal, to completion.
   * `killed`: the same query with another new journal, killed with SIGKILL (the engine's
     process group: the engine and its REPL worker) once the server has answered half the
     sub-calls. Its dollars are the requests the server answered (status 200), priced.
   * `resumed`: the same command again, with the killed run's journal. `re-sent`: requests
     of the resumed run whose body hashes (`body_sha256` in the server's log) equal those
     of a request that completed before the kill; "completed" means answered with status
     200 and a finish time before the kill (`time.monotonic()` is system-wide on Linux).
   * `kill + resume`: killed + resumed dollars, against the fresh run's. A resume *without*
     the journal sends the whole query again: it costs a fresh run (slightly less: its
     warm-up request would find the prefix the killed run left in the cache), so
     `kill + resume without journal` is killed + fresh.

Timings depend on the machine and its load: this is a shared 2-core machine, walls vary by
tens of percent between identical runs; run it on an idle one for figures to quote.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from _provenance import provenance

from rlm_async import RLM
from rlm_async._config import ModelConfig, RLMConfig
from rlm_async._types import Completion, ModelRequest
from rlm_async.demo import DEMO_LATENCY, DEMO_PRICES, demo_config, sim_config
from rlm_async.sim import LatencyModel, LogTail, SimProcess, priced, serialize_messages
from rlm_async.transport import OpenAITransport, Transport
from rlm_async.workloads import oolong_counting

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "caching.json"

CHUNKS = 1000
TOKENS = "100k"
SEED = 3
CHARS_PER_SIM_TOKEN = 4
RESUME_SUB_CAPACITY = 50
"""Sub-calls the server serves at once in the resume row: 1000 at ~0.33 s each, 50 at a
time, spread the fan-out over ~7 s, so the kill lands near half of it (the log is polled
every 10 ms: a couple of sub-calls either way)."""
SLOW_SUB_TTFT_S = 2.0
LATENCIES = {
    "demo": DEMO_LATENCY,
    # The demo's with a 2 s sub-call: longer than sending a 1000-request batch takes here, so
    # a batch sent at once has every request in flight before the first one finishes.
    "slow-sub": LatencyModel(
        root=DEMO_LATENCY.root, sub=dataclasses.replace(DEMO_LATENCY.sub, ttft_s=SLOW_SUB_TTFT_S)
    ),
}
LATENCY_RESUME = LatencyModel(
    root=DEMO_LATENCY.root,
    sub=dataclasses.replace(DEMO_LATENCY.sub, capacity=RESUME_SUB_CAPACITY),
)


# ====================================================================== one run (the engine's process)


class CapturingTransport(OpenAITransport):
    """The real HTTP transport, keeping every request it sends (to measure the shared prefix
    from the requests themselves, not from the policy's intent)."""

    def __init__(self, model: ModelConfig, sent: list[ModelRequest]) -> None:
        super().__init__(model.base_url, api_key_env=model.api_key_env, timeout_s=model.timeout_s)
        self.sent = sent

    async def complete(self, request: ModelRequest) -> Completion:
        self.sent.append(request)
        return await super().complete(request)


def _config(spec: dict[str, Any]) -> RLMConfig:
    config = demo_config(spec["base_url"], cache=spec["warm"])
    if spec.get("journal"):
        assert config.sub is not None
        config = dataclasses.replace(
            config,
            root=dataclasses.replace(config.root, temperature=0.0),
            sub=dataclasses.replace(config.sub, temperature=0.0),
            journal_path=spec["journal"],
        )
    return config


def _common_prefix(texts: list[str]) -> str:
    """The longest common start of `texts` (that of the least and the greatest of them)."""
    lo, hi = min(texts), max(texts)
    end = next((i for i, (a, b) in enumerate(zip(lo, hi, strict=False)) if a != b), min(len(lo), len(hi)))
    return lo[:end]


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the query once against the server at `spec["base_url"]`; what the engine saw."""
    workload = oolong_counting(TOKENS, seed=SEED)
    sent: list[ModelRequest] = []
    factory: Callable[[ModelConfig], Transport] | None = None
    if spec.get("capture"):

        def factory(model: ModelConfig) -> Transport:
            return CapturingTransport(model, sent)

    async def go() -> Any:
        async with RLM(config=_config(spec), transport=factory) as rlm:
            return await rlm.acompletion(workload.context, workload.query)

    result = anyio.run(go)
    out: dict[str, Any] = {
        "status": result.status,
        "correct": bool(workload.score(result.response or "")),
        "wall_s": result.execution_time,
        "total": result.total.to_dict(),
        "depth1": result.by_depth[1].to_dict() if 1 in result.by_depth else None,
    }
    if sent:
        sub_system = sent[-1].messages[0].content  # the fan-out's calls come last
        subs = [serialize_messages(r.messages) for r in sent if r.messages[0].content == sub_system]
        out["sub_requests"] = len(subs)
        out["shared_prefix_tokens"] = len(_common_prefix(subs)) // CHARS_PER_SIM_TOKEN
    return out


# ====================================================================== the driver's helpers


def _command(spec: dict[str, Any]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]


def _run_child(spec: dict[str, Any], timeout_s: float = 180.0) -> dict[str, Any]:
    proc = subprocess.run(_command(spec), capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"run {spec} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    data: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return data


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _round(d: dict[str, Any], digits: int = 4) -> dict[str, Any]:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in d.items()}


# ====================================================================== 1. prefix caching


def caching_run(warm: bool, latency: str) -> dict[str, Any]:
    """One run on a fresh server; the engine's figures and the server's."""
    with SimProcess(sim_config(CHUNKS, latency=LATENCIES[latency], seed=SEED)) as sim:
        assert sim.base_url is not None
        run = _run_child({"base_url": sim.base_url, "warm": warm, "capture": True})
        log = sim.read_log().entries
    subs = sorted((e for e in log if e.kind == "sub"), key=lambda e: e.arrival)
    roots = [e for e in log if e.kind == "root"]
    fanned_out = max(r.finish for r in roots if r.finish <= subs[0].arrival)
    prefix = run["shared_prefix_tokens"]
    head = subs[0]
    went_alone = len(subs) > 1 and subs[1].arrival >= head.finish
    return _round(
        {
            "warm": warm,
            "correct": run["correct"],
            "status": run["status"],
            "requests": len(log),
            "sub_calls": len(subs),
            "shared_prefix_tokens": prefix,
            "prefix_cached_share": sum(min(e.cached_tokens, prefix) for e in subs) / (prefix * len(subs)),
            "subs_with_hits": sum(1 for e in subs if e.cached_tokens > 0),
            "depth1_hit_ratio": run["depth1"]["cache_hit_ratio"],
            "all_calls_hit_ratio": run["total"]["cache_hit_ratio"],
            "cost_usd": run["total"]["cost_usd"],
            "cost_from_log_usd": priced(log, DEMO_PRICES),
            "wall_s": run["wall_s"],
            "fanout_s": max(e.finish for e in subs) - fanned_out,
            "warmup_alone": went_alone,
            "warmup_latency_s": head.latency_s if went_alone else None,
            "warmup_modeled_s": head.modeled_s if went_alone else None,
            # From the warm-up's finish to the next sub-call's arrival: the engine releasing
            # the rest of the batch, part of what warming costs.
            "release_s": subs[1].arrival - head.finish if went_alone else None,
            "sub_latency_median_s": statistics.median(e.latency_s for e in subs),
            "others_latency_median_s": statistics.median(e.latency_s for e in subs[1:]),
        },
        6,
    )


def caching_row(reps: int, latency: str, progress: Callable[[str], None]) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"warm_on": [], "warm_off": []}
    for i in range(reps):
        for mode in runs:
            r = caching_run(warm=mode == "warm_on", latency=latency)
            runs[mode].append(r)
            progress(
                f"caching {latency} {mode:8} #{i}: wall {r['wall_s']:.2f} s, fan-out {r['fanout_s']:.3f} s, "
                f"prefix cached {r['prefix_cached_share']:.1%}, ${r['cost_usd']:.4f}"
            )

    def med(mode: str, key: str) -> float | None:
        values = [r[key] for r in runs[mode] if r[key] is not None]
        return statistics.median(values) if values else None

    keys = (
        "prefix_cached_share",
        "depth1_hit_ratio",
        "cost_usd",
        "wall_s",
        "fanout_s",
        "warmup_latency_s",
        "warmup_modeled_s",
        "release_s",
        "sub_latency_median_s",
        "others_latency_median_s",
        "shared_prefix_tokens",
        "subs_with_hits",
    )
    medians = {mode: _round({k: med(mode, k) for k in keys}) for mode in runs}
    paired_fanout = [
        w["fanout_s"] - c["fanout_s"] for w, c in zip(runs["warm_on"], runs["warm_off"], strict=True)
    ]
    paired_wall = [w["wall_s"] - c["wall_s"] for w, c in zip(runs["warm_on"], runs["warm_off"], strict=True)]
    warmup = medians["warm_on"]["warmup_latency_s"]
    sub_latency = medians["warm_off"]["sub_latency_median_s"]
    extra = statistics.median(paired_fanout)
    return {
        "latency": latency,
        "reps": reps,
        "all_correct": all(r["correct"] for rs in runs.values() for r in rs),
        "medians": medians,
        # How far repeats spread: with the demo latency, the hits of a batch sent at once
        # depend on how fast the loaded machine gets the requests to the server.
        "ranges": {
            mode: {
                k: [min(r[k] for r in rs), max(r[k] for r in rs)]
                for k in ("prefix_cached_share", "cost_usd", "fanout_s", "wall_s")
            }
            for mode, rs in runs.items()
        },
        "warm_minus_off_fanout_s": round(extra, 4),
        "warm_minus_off_fanout_runs_s": [round(x, 4) for x in paired_fanout],
        "warm_minus_off_wall_s": round(statistics.median(paired_wall), 4),
        "warm_minus_off_wall_runs_s": [round(x, 4) for x in paired_wall],
        "warmup_latency_over_sub_latency": round(warmup / sub_latency, 3) if warmup and sub_latency else None,
        "extra_fanout_over_sub_latency": round(extra / sub_latency, 3) if sub_latency else None,
        "runs": runs,
    }


# ====================================================================== 2. resume savings


def resume_row(tmp: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    sim_cfg = sim_config(CHUNKS, latency=LATENCY_RESUME, seed=SEED)

    # Fresh: a new journal, a new server, to completion.
    with SimProcess(sim_cfg) as sim:
        assert sim.base_url is not None
        fresh = _run_child({"base_url": sim.base_url, "warm": True, "journal": str(tmp / "fresh.journal")})
        fresh_log = sim.read_log().entries
    progress(
        f"resume   fresh: {len(fresh_log)} requests, ${fresh['total']['cost_usd']:.4f}, wall {fresh['wall_s']:.2f} s"
    )

    # Killed at half the sub-calls, then resumed with its journal, against one server.
    journal = tmp / "crash.journal"
    spec_base = {"warm": True, "journal": str(journal)}
    with SimProcess(sim_cfg, log_path=tmp / "requests.jsonl") as sim:
        assert sim.base_url is not None
        spec = {**spec_base, "base_url": sim.base_url}
        tail = LogTail(sim.log_path)
        with (tmp / "killed.out").open("wb") as out:
            started = time.monotonic()
            first = subprocess.Popen(_command(spec), stdout=out, stderr=out, cwd=ROOT, start_new_session=True)
            try:
                give_up = time.monotonic() + 120
                while tail.answered() < CHUNKS // 2:
                    if first.poll() is not None:
                        raise RuntimeError(
                            "the run to kill ended first:\n" + (tmp / "killed.out").read_text()
                        )
                    if time.monotonic() > give_up:
                        raise RuntimeError("the run to kill never got halfway")
                    time.sleep(0.01)
                killed_at = time.monotonic()
                os.killpg(first.pid, signal.SIGKILL)
                first.wait()
            finally:
                _kill_group(first.pid)
        sim.wait_until_idle()
        run1 = sim.read_log().entries
        resumed_at = time.monotonic()
        resumed = _run_child(spec)
        run2 = [e for e in sim.read_log().entries if e.arrival >= resumed_at]

    completed = [e for e in run1 if e.status == 200 and e.finish < killed_at]
    completed_subs = [e for e in completed if e.kind == "sub"]
    done = {e.body_sha256 for e in completed}
    resent = [e for e in run2 if e.body_sha256 in done]
    answered_after_kill = [e for e in run1 if e.status == 200 and e.finish >= killed_at]
    killed_cost = priced(run1, DEMO_PRICES)
    resumed_cost = resumed["total"]["cost_usd"]
    fresh_cost = fresh["total"]["cost_usd"]
    run2_subs = [e for e in run2 if e.kind == "sub"]
    progress(
        f"resume   killed after {killed_at - started:.2f} s at {len(completed_subs)} sub-calls done; "
        f"resumed: {len(run2)} requests, ${resumed_cost:.4f}, {len(resent)} re-sent"
    )
    return _round(
        {
            "fresh": {
                "correct": fresh["correct"],
                "requests": len(fresh_log),
                "calls": fresh["total"]["calls"],
                "cost_usd": fresh_cost,
                "cost_from_log_usd": priced(fresh_log, DEMO_PRICES),
                "wall_s": fresh["wall_s"],
            },
            "killed": {
                "killed_after_s": killed_at - started,
                "requests": len(run1),
                "completed_before_kill": len(completed),
                "completed_subs_before_kill": len(completed_subs),
                "completed_subs_share": len(completed_subs) / CHUNKS,
                "answered_after_kill": len(answered_after_kill),
                "cancelled": sum(1 for e in run1 if e.outcome == "cancelled"),
                "cost_usd": killed_cost,
            },
            "resumed": {
                "correct": resumed["correct"],
                "status": resumed["status"],
                "requests": len(run2),
                "sub_requests": len(run2_subs),
                "sub_requests_with_cache_hits": sum(1 for e in run2_subs if e.cached_tokens > 0),
                "calls": resumed["total"]["calls"],
                "journal_hits": resumed["total"]["journal_hits"],
                "resent_completed": len(resent),
                "cost_usd": resumed_cost,
                "cost_from_log_usd": priced(run2, DEMO_PRICES),
                "wall_s": resumed["wall_s"],
            },
            "kill_plus_resume_usd": killed_cost + resumed_cost,
            "kill_plus_resume_over_fresh": (killed_cost + resumed_cost) / fresh_cost,
            "kill_plus_rerun_without_journal_usd": killed_cost + fresh_cost,
            "resume_saves_usd": fresh_cost - resumed_cost,
        },
        6,
    )


# ====================================================================== report


def print_table(result: dict[str, Any], file: Any = sys.stdout) -> None:
    rows_by_latency: dict[str, dict[str, Any]] = result["prefix_caching"]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    def sec(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}"

    lines: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("shared-prefix tokens (measured)", lambda m: num(m["shared_prefix_tokens"])),
        ("sub-calls with cache hits", lambda m: num(m["subs_with_hits"])),
        ("share of shared-prefix tokens cached", lambda m: pct(m["prefix_cached_share"])),
        ("cache hit ratio, depth 1 (all prompt tok)", lambda m: pct(m["depth1_hit_ratio"])),
        ("$ per run", lambda m: f"{m['cost_usd']:.4f}"),
        ("wall s", lambda m: sec(m["wall_s"])),
        ("fan-out phase s", lambda m: sec(m["fanout_s"])),
        ("warm-up latency s (alone in the server)", lambda m: sec(m["warmup_latency_s"])),
        ("warm-up finish -> next sub-call sent s", lambda m: sec(m["release_s"])),
        ("sub-call latency s, median of all", lambda m: sec(m["sub_latency_median_s"])),
    ]
    reps = {c["reps"] for c in rows_by_latency.values()}
    print(
        f"1. Prefix caching: {CHUNKS} sub-calls, medians of {'/'.join(map(str, sorted(reps)))} alternating "
        f"runs per column; latency settings below",
        file=file,
    )
    width = max(len(label) for label, _ in lines)
    head = f"  {'':{width}}"
    for name in rows_by_latency:
        head += f"  {name + ' on':>13}  {name + ' off':>13}"
    print(head, file=file)
    for label, cell in lines:
        line = f"  {label:{width}}"
        for c in rows_by_latency.values():
            line += f"  {cell(c['medians']['warm_on']):>13}  {cell(c['medians']['warm_off']):>13}"
        print(line, file=file)
    for name, c in rows_by_latency.items():
        print(
            f"  {name}: on - off (median of per-repeat differences): fan-out {c['warm_minus_off_fanout_s']:+.3f} s, "
            f"wall {c['warm_minus_off_wall_s']:+.3f} s; warm-up latency = {c['warmup_latency_over_sub_latency']}x "
            f"and extra fan-out = {c['extra_fanout_over_sub_latency']}x the median sub-call latency (warming off); "
            f"all correct: {'yes' if c['all_correct'] else 'NO'}",
            file=file,
        )
        for mode, label in (("warm_on", "on"), ("warm_off", "off")):
            rg = c["ranges"][mode]
            print(
                f"    {label:3} over the repeats: prefix cached {rg['prefix_cached_share'][0]:.1%}-"
                f"{rg['prefix_cached_share'][1]:.1%}, $ {rg['cost_usd'][0]:.4f}-{rg['cost_usd'][1]:.4f}, "
                f"fan-out {rg['fanout_s'][0]:.3f}-{rg['fanout_s'][1]:.3f} s",
                file=file,
            )
    for name, latency in result["latency"]["prefix_caching"].items():
        print(
            f"  latency {name}: sub {_describe(latency['sub'])}; root {_describe(latency['root'])}", file=file
        )

    r = result["resume"]
    f, k, s = r["fresh"], r["killed"], r["resumed"]
    print(
        f"\n2. Resume savings: {CHUNKS} sub-calls, temperature 0, journal on; latency: demo, sub-calls "
        f"{RESUME_SUB_CAPACITY} at a time at the server",
        file=file,
    )
    print(f"  {'run':44} {'requests':>8} {'$':>8} {'wall s':>7}", file=file)
    print(
        f"  {'fresh, to completion':44} {f['requests']:8d} {f['cost_usd']:8.4f} {f['wall_s']:7.2f}", file=file
    )
    killed_label = f"killed (SIGKILL at {k['completed_subs_share']:.0%} of sub-calls done)"
    print(
        f"  {killed_label:44} "
        f"{k['requests']:8d} {k['cost_usd']:8.4f} {k['killed_after_s']:7.2f}   ({k['completed_before_kill']} completed before the kill, "
        f"{k['cancelled']} cancelled)",
        file=file,
    )
    print(
        f"  {'resumed with the same journal':44} {s['requests']:8d} {s['cost_usd']:8.4f} {s['wall_s']:7.2f}   "
        f"({s['journal_hits']} of {s['calls']} calls from the journal; {s['sub_requests_with_cache_hits']} of "
        f"{s['sub_requests']} sent sub-calls hit the prefix cache; correct: {'yes' if s['correct'] else 'NO'})",
        file=file,
    )
    print(
        f"  completed-before-the-kill requests re-sent: {s['resent_completed']} of {k['completed_before_kill']}",
        file=file,
    )
    print(
        f"  kill + resume: ${r['kill_plus_resume_usd']:.4f} = {r['kill_plus_resume_over_fresh']:.2f}x the fresh run's "
        f"${f['cost_usd']:.4f}; without the journal (resume = a fresh run): ${r['kill_plus_rerun_without_journal_usd']:.4f}",
        file=file,
    )


def _describe(k: dict[str, Any]) -> str:
    text = (
        f"{k['ttft_s']} s + {k['prefill_s_per_token']} s/uncached prompt token + "
        f"{k['output_s_per_token']} s/output token, jitter {k['jitter']:.0%}"
    )
    return text + (f", {k['capacity']} at a time" if k.get("capacity") else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    p.add_argument("--one", help=argparse.SUPPRESS)  # run one spec in this process, print JSON
    p.add_argument("--reps", type=int, default=5, help="alternating warm-up on/off runs (default 5)")
    p.add_argument(
        "--latency",
        default=",".join(LATENCIES),
        help=f"prefix-caching settings to run (default {','.join(LATENCIES)})",
    )
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return 0

    started = time.monotonic()

    def progress(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", file=sys.stderr, flush=True)

    load_before = os.getloadavg()
    names = args.latency.split(",")
    if not set(names) <= set(LATENCIES):
        p.error(f"unknown latency setting in {args.latency!r}; known: {', '.join(LATENCIES)}")
    caching = {name: caching_row(args.reps, name, progress) for name in names}
    with tempfile.TemporaryDirectory(prefix="caching-bench-") as tmp:
        resume = resume_row(Path(tmp), progress)
    result = {
        **provenance(
            "caching.py",
            argv,
            load_avg_before=load_before,
            load_avg_after=os.getloadavg(),
            note="shared machine: other processes ran alongside",
        ),
        "workload": {"task": "oolong_counting", "tokens": TOKENS, "seed": SEED, "chunks": CHUNKS},
        "prices_usd_per_mtok": {m: dataclasses.asdict(p) for m, p in DEMO_PRICES.items()},
        "latency": {
            "prefix_caching": {
                name: {
                    "root": dataclasses.asdict(LATENCIES[name].root),
                    "sub": dataclasses.asdict(LATENCIES[name].sub),
                }
                for name in names
            },
            "resume": {
                "root": dataclasses.asdict(LATENCY_RESUME.root),
                "sub": dataclasses.asdict(LATENCY_RESUME.sub),
            },
        },
        "benchmark_wall_s": round(time.monotonic() - started, 1),
        "prefix_caching": caching,
        "resume": resume,
    }
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {out} ({result['benchmark_wall_s']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
