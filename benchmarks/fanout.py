"""Fan-out benchmark: how close the engine comes to the physical limit of a fan-out.

    .venv/bin/python benchmarks/fanout.py --merge benchmarks/results/fanout_sequential_10m.json
        [--repeat 3] [--cases count-1m,count-10m,niah-128k] [--variants concurrent,...]
        [--out benchmarks/results/fanout.json] [--latency bench|realistic] [--profile DIR]

    # about 4 min with --repeat 3 on 2 shared cores. The one-call-at-a-time run at 1000
    # chunks (about 5.5 min) is left out of the default plan; run it apart, then merge it:
    .venv/bin/python benchmarks/fanout.py --only count-10m:sequential --repeat 1 \
        --out benchmarks/results/fanout_sequential_10m.json

Without the merged file, the count-10m one-at-a-time figure is an extrapolation, labelled
so. The simulator (`rlm_async.sim`: scripted root and sub models over seeded synthetic
workloads with known answers) runs in a child process; the engine runs in the measuring
process. Every run is a fresh process, so peak RSS does not carry over between runs.

Cases (the issue's): COUNT (OOLONG-like counting) over 1M tokens in 100 chunks and 10M
tokens in 1000 chunks (both about 46 KB per sub-call prompt); S-NIAH at 128K tokens in 8
chunks. Variants:

* `concurrent`  the engine as built: one `llm_batch` fans out at once, warm-up "auto"
* `sequential`  the sub model's `EndpointLimits(max_concurrency=1)`: one sub-call at a time,
                what the paper's blocking implementation achieves
* `warm-off`    as `concurrent` with `CacheSettings(warm=False)`: no warm-up before fan-outs
* `traced`      as `concurrent` with a `TraceWriter` sink attached (tracing overhead)

Latency model (`--latency bench`, the default): the demo's numbers with the sub-call ttft
lowered to 0.2 s (so that 1000 sequential sub-calls stay near 5 minutes) and the jitter at
2%. `--latency realistic`: `LatencyModel.realistic()` with 2% jitter, a longer critical
path against the same engine costs.

Figures per run (the JSON has more):

* `wall`        `acompletion`'s `execution_time`
* `bound`       the critical-path lower bound from the simulator's own draws
                (`rlm_async.sim.critical_path`: root turns + the slowest sub-call of each
                fan-out; no server capacity or rate limits are configured here). The same
                physical bound for every variant, so `w/b` of `sequential` is what
                one-at-a-time costs; `sched` is wall over the bound of the variant's own
                schedule (for `sequential`, the requests served one at a time), i.e. its own
                per-call overhead
* `infl`        the most requests the server held at once (its log, at each arrival)
* `cpu ms/sub`  CPU of the engine process over `acompletion` (workload generation and the
                benchmark's sampler thread excluded) / sub-calls; `fan-out`: the same over
                each fan-out's window only (from the root reply that asked for it to the next
                request after it), without the run's fixed costs. The REPL worker is another
                process: `worker s` is its CPU, sampled from /proc every 0.1 s (a worker
                killed in its sandbox is not always reaped by us, so RUSAGE_CHILDREN misses
                it; that figure is kept as `reaped_children_cpu_s`); `sim s` is the
                simulator's (from /proc). Neither is in `cpu ms/sub`
* `RSS MB`      `ru_maxrss` of the run's process (context, engine, and the workload
                generator's own peak), against `target` = 2.5 x context + 150 MB
* `hit`         cached sub-call tokens / (sub-calls x the shared sub-prompt prefix the
                simulator can cache: system prompt + instructions, whole 128-token blocks
                from 1024); a warm-up's best is (N-1)/N
* `$`           dollars at the demo's stand-in prices (`rlm_async.demo.DEMO_PRICES`);
                `$ no-cache` prices the same tokens with no cached discount

Each (case, variant) is run `--repeat` times (sequential ones once). A row shows the run
with the median wall for wall, bound, tokens and dollars, and the median over the runs for
each CPU figure; every run is in the JSON, with the load average around it: this is a
shared 2-core machine and walls vary by tens of percent between identical runs. Per case,
the summary compares variants: the warm-up's cost in wall (median warm-on minus median
warm-off) and the dollars it saves; tracing's overhead (median engine CPU traced / untraced
- 1, and the CPU spent inside the trace sink itself, timed by a wrapper); one-at-a-time
against concurrent.

Each run also cuts its wall time into consecutive pieces on one clock (the engine's and
the simulator's `time.monotonic`): before the first request, each root turn and fan-out as
the server saw it, and the gaps between them (engine + REPL worker time, no request in the
server); a fan-out is split further into the warm-up, the release of the rest, the spread
of their arrivals and the drain, with the simulator's own lag over its draws. A probe per
case times the REPL worker building the fan-out's prompts and handing them to the engine
over the control channel (no HTTP). `--profile DIR` adds a cProfile of the engine process
per run (slower; its timings are not the benchmark's).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import io
import itertools
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from _provenance import provenance

from rlm_async import RLM, EndpointLimits, _loop
from rlm_async._cache import CacheSettings
from rlm_async._config import RLMConfig
from rlm_async._trace import TraceWriter
from rlm_async.demo import DEMO_PRICES, demo_config, sim_config
from rlm_async.sim import (
    CacheModel,
    KindLatency,
    LatencyModel,
    LogEntry,
    SimProcess,
    critical_path,
    serialize_messages,
)
from rlm_async.sim.policies import sub_prompt_header
from rlm_async.workloads import make_workload

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "fanout.json"

BENCH_LATENCY = LatencyModel(
    root=KindLatency(ttft_s=0.4, prefill_s_per_token=1e-5, output_s_per_token=0.004, jitter=0.02),
    sub=KindLatency(ttft_s=0.2, prefill_s_per_token=1e-5, output_s_per_token=0.004, jitter=0.02),
)
LATENCIES = {
    "bench": BENCH_LATENCY,
    # `LatencyModel.realistic()` (hosted-API-like guesses: 0.25 s sub ttft, slower decoding)
    # with the same 2% jitter: the engine's fixed costs against a longer critical path.
    "realistic": LatencyModel(
        root=dataclasses.replace(LatencyModel.realistic().root, jitter=0.02),
        sub=dataclasses.replace(LatencyModel.realistic().sub, jitter=0.02),
    ),
}


@dataclass(frozen=True)
class Case:
    task: str
    tokens: str
    chunks: int


CASES: dict[str, Case] = {
    "count-1m": Case(task="oolong", tokens="1M", chunks=100),
    "count-10m": Case(task="oolong", tokens="10M", chunks=1000),
    # 2K-token chunks, as a sub model with an 8K context window needs: the widest fan-out.
    "count-10m-5k": Case(task="oolong", tokens="10M", chunks=5000),
    "niah-128k": Case(task="s-niah", tokens="128K", chunks=8),
}
VARIANTS = ("concurrent", "sequential", "warm-off", "traced")
# Left out of the default plan: ~1000 x 0.31 s one at a time. Run it with --only (above).
LONG = {("count-10m", "sequential"), ("count-10m-5k", "sequential")}


# ====================================================================== one run (a child process)


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of another process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Sampler:
    """A thread that samples, every `interval_s`: this process's CPU clock (so CPU can be
    split by phase afterwards), and the CPU of its descendants (the REPL workers) from /proc,
    since a worker killed inside its sandbox is not always reaped by us, which leaves it out
    of RUSAGE_CHILDREN. Up to one interval of a worker's last CPU can be missed. `exclude`
    (the simulator's pid) and its descendants are not counted. The thread's own cost is a
    few file reads per sample, inside this process's CPU figures."""

    def __init__(self, exclude: int, interval_s: float = 0.02, proc_every: int = 5) -> None:
        import threading

        self._exclude = exclude
        self._interval = interval_s
        self._proc_every = proc_every
        self._seen: dict[tuple[int, str], float] = {}
        self.own_cpu_s = 0.0
        """The sampler thread's own CPU seconds (subtracted from the engine's figures)."""
        self.cpu_samples: list[tuple[float, float, float]] = []
        """(time.monotonic(), time.process_time(), this thread's time.thread_time())."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def descendants_cpu_s(self) -> float:
        return sum(self._seen.values())

    def _at(self, t: float, index: int) -> float:
        samples = self.cpu_samples
        if not samples:
            return 0.0
        if t <= samples[0][0]:
            return samples[0][index]
        for a, b in itertools.pairwise(samples):
            if a[0] <= t <= b[0]:
                share = (t - a[0]) / (b[0] - a[0]) if b[0] > a[0] else 0.0
                return a[index] + (b[index] - a[index]) * share
        return samples[-1][index]

    def cpu_at(self, t: float) -> float:
        """This process's CPU clock less the sampler's own, at monotonic time `t`
        (interpolated between samples)."""
        return self._at(t, 1) - self._at(t, 2)

    def own_cpu_between(self, t0: float, t1: float) -> float:
        """The sampler thread's CPU seconds between two monotonic times."""
        return self._at(t1, 2) - self._at(t0, 2)

    def _children(self, pid: int) -> list[int]:
        out: list[int] = []
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                    out.extend(int(c) for c in f.read().split())
        except OSError:
            pass
        return out

    def _scan(self) -> None:
        todo = [c for c in self._children(os.getpid()) if c != self._exclude]
        while todo:
            pid = todo.pop()
            try:
                with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                    fields = f.read().rpartition(")")[2].split()
                cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                key = (pid, fields[19])  # pid + start time: a reused pid is another process
                self._seen[key] = max(self._seen.get(key, 0.0), cpu)
            except (OSError, IndexError, ValueError):
                continue
            todo.extend(self._children(pid))

    def _run(self) -> None:
        n = 0
        while True:
            self.cpu_samples.append((time.monotonic(), time.process_time(), time.thread_time()))
            if n % self._proc_every == 0:
                self._scan()
            n += 1
            if self._stop.wait(self._interval):
                break
        self._scan()
        self.cpu_samples.append((time.monotonic(), time.process_time(), time.thread_time()))
        self.own_cpu_s = time.thread_time()


class GCTimer:
    """Adds up the CPU time the garbage collector runs, per generation, by `gc.callbacks`
    (thread CPU: a collection runs in the thread whose allocation triggered it)."""

    def __init__(self) -> None:
        self.by_generation = [0.0, 0.0, 0.0]
        self.counts = [0, 0, 0]
        self._t = 0.0

    @property
    def seconds(self) -> float:
        return sum(self.by_generation)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t = time.thread_time()
        else:
            self.by_generation[info["generation"]] += time.thread_time() - self._t
            self.counts[info["generation"]] += 1

    def __enter__(self) -> GCTimer:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)


class TimedSink:
    """Wraps a sink and adds up the CPU time spent inside its calls (thread CPU clock)."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.cpu_s = 0.0
        self.events = 0

    def __call__(self, event: Any) -> None:
        t = time.thread_time()
        try:
            self.sink(event)
        finally:
            self.cpu_s += time.thread_time() - t
            self.events += 1


def _config(variant: str, base_url: str) -> RLMConfig:
    config = demo_config(base_url, cache=variant != "warm-off")
    if variant == "sequential":
        assert config.sub is not None
        config = dataclasses.replace(
            config, sub=dataclasses.replace(config.sub, limits=EndpointLimits(max_concurrency=1))
        )
    return config


def _shared_prefix_tokens(query: str, cache: CacheModel) -> int:
    """Tokens of the sub-call prompts' shared prefix that the simulator's cache can hold:
    the serialized system prompt and instructions, in whole blocks from the minimum."""
    from rlm_async._prompts import sub_system_prompt

    head = serialize_messages([{"role": "system", "content": sub_system_prompt()}])[: -len("<|assistant|>")]
    prefix = head + "<|user|>" + sub_prompt_header(query) + "Chunk "
    tokens = len(prefix) // 4
    if tokens < cache.min_tokens:
        return 0
    return tokens // cache.step_tokens * cache.step_tokens


def _uncached_cost(result: Any) -> float:
    cost = 0.0
    for model, totals in result.by_model.items():
        price = DEMO_PRICES[model]
        cost += (
            totals.prompt_tokens * price.input_per_mtok + totals.completion_tokens * price.output_per_mtok
        ) / 1e6
    return cost


def timeline(entries: list[LogEntry], t0: float, t1: float, path: Any, sampler: Sampler) -> dict[str, Any]:
    """Wall time cut into consecutive pieces on one clock: before the first request, each
    root turn and each fan-out as the server saw them (first arrival to last finish), and the
    gaps between them, in which no request was in the server: engine and worker time.

    Each fan-out also gets the engine's CPU over its window, from the end of the root turn
    that asked for it to the start of the next piece after it (the cell running, the prompts
    crossing the control channel, planning, sending, reading the answers, handing them
    back): `engine_cpu_ms_per_subcall` without the run's fixed costs (worker start, context
    shipping, root turns)."""
    served = sorted((e for e in entries if e.start is not None), key=lambda e: e.seq)
    groups: list[list[LogEntry]] = []
    for e in served:
        if e.kind == "root" or not groups or groups[-1][0].kind == "root":
            groups.append([e])
        else:
            groups[-1].append(e)
    pieces: list[dict[str, Any]] = []
    cursor = t0
    fanout_index = 0
    open_window: tuple[dict[str, Any], float] | None = None  # a fan-out and its window's start

    def close_window(end: float) -> None:
        nonlocal open_window
        if open_window is not None:
            piece, begin = open_window
            cpu = sampler.cpu_at(end) - sampler.cpu_at(begin)
            piece["engine_cpu_window_s"] = round(cpu, 4)
            piece["engine_cpu_ms_per_subcall"] = round(1e3 * cpu / piece["n"], 4)
            open_window = None

    for g in groups:
        first = min(e.arrival for e in g)
        last = max(e.finish for e in g)
        close_window(first)
        pieces.append({"what": "gap", "s": round(first - cursor, 4)})
        if g[0].kind == "root":
            e = g[0]
            pieces.append(
                {
                    "what": "root turn",
                    "s": round(last - first, 4),
                    "modeled_s": round(e.modeled_s or 0.0, 4),
                    "queue_and_body_s": round((e.start or e.arrival) - e.arrival, 4),
                }
            )
        else:
            by_arrival = sorted(g, key=lambda e: e.arrival)
            arrivals = [e.arrival for e in by_arrival]
            lags = [(e.finish - (e.start or e.arrival)) - (e.modeled_s or 0.0) for e in g]
            head = by_arrival[0]
            # A warm-up: the first sub-call was alone in the server until it finished.
            warmed = len(g) > 1 and arrivals[1] >= head.finish
            bound = path.fanouts[fanout_index].bound_s if fanout_index < len(path.fanouts) else None
            fanout_index += 1
            pieces.append(
                {
                    "what": "fan-out",
                    "n": len(g),
                    "s": round(last - first, 4),
                    "bound_s": None if bound is None else round(bound, 4),
                    "first_gap_s": round(arrivals[1] - arrivals[0], 4) if len(g) > 1 else 0.0,
                    "warmup_s": round(head.finish - head.arrival, 4) if warmed else 0.0,
                    "warmup_modeled_s": round(head.modeled_s or 0.0, 4) if warmed else 0.0,
                    "release_s": round(arrivals[1] - head.finish, 4) if warmed else 0.0,
                    "followers_spread_s": round(arrivals[-1] - arrivals[1 if warmed else 0], 4),
                    "arrival_spread_s": round(arrivals[-1] - arrivals[0], 4),
                    "last_arrival_to_last_finish_s": round(last - arrivals[-1], 4),
                    "max_queue_and_body_s": round(max((e.start or e.arrival) - e.arrival for e in g), 4),
                    "sim_lag_mean_ms": round(1e3 * statistics.fmean(lags), 2),
                    "sim_lag_max_ms": round(1e3 * max(lags), 2),
                }
            )
            open_window = (pieces[-1], cursor)
        cursor = last
    close_window(t1)
    pieces.append({"what": "gap", "s": round(t1 - cursor, 4)})
    gaps = sum(p["s"] for p in pieces if p["what"] == "gap")
    return {"pieces": pieces, "gaps_s": round(gaps, 4), "sum_s": round(sum(p["s"] for p in pieces), 4)}


async def _query(
    spec: dict[str, Any],
    workload: Any,
    base_url: str,
    out: dict[str, Any],
    trace_dir: str,
    profile: cProfile.Profile | None,
) -> Any:
    config = _config(spec["variant"], base_url)
    writer = TraceWriter(trace_dir) if spec["variant"] == "traced" else None
    timed = TimedSink(writer) if writer is not None else None
    sinks: list[Any] = [timed] if timed is not None else []
    cpu_setup = time.process_time()
    async with RLM(config=config) as rlm:
        out["rss_before_query_mb"] = round(_rss_mb(), 1)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        cpu0, t0 = time.process_time(), time.monotonic()
        if profile is not None:
            profile.enable()
        result = await rlm.acompletion(workload.context, workload.query, event_sinks=sinks)
        if profile is not None:
            profile.disable()
        t1, cpu1 = time.monotonic(), time.process_time()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
    # User and system time apart: system time is mostly the loopback TCP stack (each send
    # carries the packet through to the simulator's socket in this process's context).
    # (getrusage of the whole process: the sampler thread's few ms are in these two.)
    out["engine_user_s"] = round(ru1.ru_utime - ru0.ru_utime, 4)
    out["engine_sys_s"] = round(ru1.ru_stime - ru0.ru_stime, 4)
    if writer is not None:
        writer.close()
    out["engine_cpu_with_setup_s"] = time.process_time() - cpu_setup
    out["engine_cpu_raw_s"] = cpu1 - cpu0
    if timed is not None:
        out["trace_sink_cpu_s"] = round(timed.cpu_s, 4)
        out["trace_events"] = timed.events
    out["t0"], out["t1"] = t0, t1
    return result


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    case = CASES[spec["case"]]
    out: dict[str, Any] = {
        "case": spec["case"],
        "variant": spec["variant"],
        "repeat": spec.get("repeat", 0),
    }
    loop = spec.get("loop", "default")
    # "default": the loop rlm_async picks where it runs its own (uvloop where installed).
    options = _loop.backend_options() if loop == "default" else {"use_uvloop": loop == "uvloop"}
    out["loop"] = "uvloop" if options["use_uvloop"] else "asyncio"
    out["load_avg_before"] = os.getloadavg()[0]
    gen0 = time.process_time()
    workload = make_workload(case.task, case.tokens, seed=spec.get("seed", 0))
    out["generation_cpu_s"] = round(time.process_time() - gen0, 3)
    context_chars = len(workload.context)
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    latency = LATENCIES[spec.get("latency", "bench")]
    out["latency"] = spec.get("latency", "bench")
    sim_cfg = sim_config(case.chunks, latency=latency, seed=spec.get("seed", 0))
    with SimProcess(sim_cfg) as sim:
        assert sim.base_url is not None and sim.pid is not None
        sim_cpu0 = _proc_cpu_s(sim.pid)
        profile = cProfile.Profile() if spec.get("profile") else None
        with (
            tempfile.TemporaryDirectory(prefix="fanout-trace-") as trace_dir,
            Sampler(exclude=sim.pid) as sampler,
        ):
            with GCTimer() as gc_timer:
                result = anyio.run(
                    _query,
                    spec,
                    workload,
                    sim.base_url,
                    out,
                    trace_dir,
                    profile,
                    backend_options=options,
                )
            out["gc_cpu_s"] = round(gc_timer.seconds, 4)
            out["gc_cpu_s_by_generation"] = [round(x, 4) for x in gc_timer.by_generation]
            out["gc_collections_by_generation"] = gc_timer.counts
            if spec["variant"] == "traced":
                out["trace_bytes"] = sum(p.stat().st_size for p in Path(trace_dir).glob("*.jsonl"))
        if profile is not None:
            text = io.StringIO()
            stats = pstats.Stats(profile, stream=text)
            stats.sort_stats("tottime").print_stats(45)
            stats.sort_stats("cumulative").print_stats(60)
            Path(spec["profile"]).write_text(text.getvalue(), encoding="utf-8")
        sim_cpu1 = _proc_cpu_s(sim.pid)
        sim_peak = _proc_peak_rss_mb(sim.pid)
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # workers reaped; the sim is alive
        log = sim.read_log()
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["load_avg_after"] = os.getloadavg()[0]

    entries = list(log)
    subs = [e for e in entries if e.kind == "sub" and e.start is not None]
    sub_calls = sum(1 for c in result.calls if c.kind == "sub")
    path = critical_path(log, latency)
    seq_path = critical_path(log, latency, capacity=1)
    prefix = _shared_prefix_tokens(workload.query, sim_cfg.cache)
    wall = result.execution_time
    # The query's CPU (process_time around acompletion) less the sampler thread's own.
    engine_cpu = out["engine_cpu_raw_s"] - sampler.own_cpu_between(out["t0"], out["t1"])
    tl = timeline(entries, out["t0"], out["t1"], path, sampler)
    fanout_pieces = [p for p in tl["pieces"] if p["what"] == "fan-out"]
    context_mb = context_chars / 2**20  # ASCII: one byte a character
    cached_sub = sum(e.cached_tokens for e in subs)
    out.update(
        task=case.task,
        tokens=case.tokens,
        chunks=case.chunks,
        context_chars=context_chars,
        correct=bool(workload.score(result.response or "")),
        status=result.status,
        answer=result.response,
        truth=workload.truth,
        wall_s=round(wall, 3),
        outer_wall_s=round(out["t1"] - out["t0"], 3),
        requests=len(entries),
        sub_calls=sub_calls,
        peak_in_flight=log.max_in_flight(),
        peak_in_service=log.peak_concurrency(),
        prompt_tokens=result.total.prompt_tokens,
        cached_tokens=result.total.cached_tokens,
        completion_tokens=result.total.completion_tokens,
        cost_usd=round(result.total.cost_usd, 6),
        cost_uncached_usd=round(_uncached_cost(result), 6),
        sub_shared_prefix_tokens=prefix,
        sub_cached_tokens=cached_sub,
        sub_cache_hit_ratio=round(cached_sub / (len(subs) * prefix), 4) if subs and prefix else None,
        bound_s=round(path.bound_s, 4),
        bound_root_s=round(path.root_s, 4),
        bound_fanout_s=round(path.fanout_s, 4),
        bound_source=path.source,
        wall_over_bound=round(wall / path.bound_s, 4) if path.bound_s else None,
        bound_one_at_a_time_s=round(seq_path.bound_s, 4),
        wall_over_schedule_bound=round(
            wall / (seq_path.bound_s if spec["variant"] == "sequential" else path.bound_s), 4
        ),
        engine_cpu_s=round(engine_cpu, 4),
        engine_cpu_ms_per_subcall=round(1e3 * engine_cpu / sub_calls, 4) if sub_calls else None,
        fanout_engine_cpu_ms_per_subcall=round(
            1e3 * sum(p["engine_cpu_window_s"] for p in fanout_pieces) / sum(p["n"] for p in fanout_pieces), 4
        )
        if fanout_pieces
        else None,
        sampler_cpu_s=round(sampler.own_cpu_s, 4),
        worker_cpu_s=round(sampler.descendants_cpu_s, 3),
        reaped_children_cpu_s=round(
            (children1.ru_utime - children0.ru_utime) + (children1.ru_stime - children0.ru_stime), 4
        ),
        sim_cpu_s=round(sim_cpu1 - sim_cpu0, 3),
        sim_cpu_ms_per_request=round(1e3 * (sim_cpu1 - sim_cpu0) / max(1, len(entries)), 3),
        sim_peak_rss_mb=round(sim_peak, 1),
        peak_rss_mb=round(peak_rss_mb, 1),
        context_mb=round(context_mb, 2),
        rss_target_mb=round(2.5 * context_mb + 150, 1),
        timeline=tl,
    )
    for key in ("t0", "t1"):
        out.pop(key)
    out["engine_cpu_with_setup_s"] = round(out["engine_cpu_with_setup_s"], 4)
    return out


# ====================================================================== the prompt-transfer probe


def _compute_code(workload: Any, chunks: int) -> str:
    """The code the scripted root model writes on its compute turn for this workload."""
    from rlm_async._parsing import find_code_blocks
    from rlm_async._prompts import describe_context, first_user_message, root_system_prompt
    from rlm_async._types import Message
    from rlm_async.sim import PolicyRequest, make_policy

    policy = make_policy("rlm", chunks=chunks, max_chunks=max(chunks, 1000))
    messages = (
        Message("system", root_system_prompt()),
        Message("user", first_user_message(describe_context(workload.context), workload.query)),
        Message("assistant", "Let me look."),
        Message("user", f"TYPE str LEN {len(workload.context)}"),
    )
    reply = policy(PolicyRequest(model="sim-model", messages=messages, kind="root"))
    return find_code_blocks(reply)[0]


async def _probe(workload: Any, chunks: int, out: dict[str, Any]) -> None:
    from rlm_async.sandbox import SandboxConfig, WorkerRequest, start_worker

    code = _compute_code(workload, chunks)
    assert "answers = llm_batch(prompts)" in code
    answer = "COUNT: 0" if workload.name.startswith("oolong") else "NONE"
    build_only = code.replace("answers = llm_batch(prompts)", f"answers = [{answer!r}] * len(prompts)")
    seen: dict[str, float] = {}

    async def instant(request: WorkerRequest) -> list[str]:
        seen["received"] = time.monotonic()
        seen["prompts"] = len(request.prompts)
        seen["prompt_chars"] = sum(len(p) for p in request.prompts)
        return [answer] * len(request.prompts)

    t = time.monotonic()
    worker = await start_worker(workload.context, SandboxConfig())
    out["worker_start_s"] = time.monotonic() - t
    try:
        for name, cell in (("build_only", build_only), ("with_llm_batch", code)):
            cpu0, t0 = time.process_time(), time.monotonic()
            result = await worker.run_cell(cell, instant)
            out[f"{name}_cell_s"] = result.duration_s
            out[f"{name}_wall_s"] = time.monotonic() - t0
            out[f"{name}_engine_cpu_s"] = time.process_time() - cpu0
            if name == "with_llm_batch":
                out["cell_start_to_request_s"] = seen["received"] - t0
                out["prompts"] = seen["prompts"]
                out["prompt_mb"] = seen["prompt_chars"] / 2**20
    finally:
        await worker.aclose()


def run_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """What one fan-out costs before any request is sent, for one case: the worker building
    the prompts alone, then the same cell sending them over the control channel to an
    instant handler (no HTTP, no model)."""
    case = CASES[spec["case"]]
    workload = make_workload(case.task, case.tokens, seed=spec.get("seed", 0))
    out: dict[str, Any] = {"case": spec["case"], "probe": "prompt_transfer"}
    anyio.run(_probe, workload, case.chunks, out)
    out["transfer_and_dispatch_s"] = out["with_llm_batch_wall_s"] - out["build_only_wall_s"]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


# ====================================================================== the driver


def _spawn(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"run {spec} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    data: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    data["process_wall_s"] = round(time.monotonic() - started, 2)
    return data


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    return ordered[(len(ordered) - 1) // 2]


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec)


_FROM_MEDIAN_RUN = (
    "correct",
    "wall_s",
    "bound_s",
    "wall_over_bound",
    "wall_over_schedule_bound",
    "requests",
    "sub_calls",
    "peak_in_flight",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "sub_cache_hit_ratio",
    "cost_usd",
    "cost_uncached_usd",
    "peak_rss_mb",
    "rss_target_mb",
)
_MEDIANS = (
    "engine_cpu_s",
    "engine_cpu_ms_per_subcall",
    "fanout_engine_cpu_ms_per_subcall",
    "worker_cpu_s",
    "sim_cpu_s",
)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per (case, variant): the run with the median wall time for wall, bound,
    tokens and dollars; the median over the runs for CPU figures (each on its own)."""
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        by_key.setdefault((r["case"], r["variant"]), []).append(r)
    rows = []
    for case in CASES:
        for variant in VARIANTS:
            group = by_key.get((case, variant))
            if not group:
                continue
            m = _median_run(group)
            row: dict[str, Any] = {
                "case": case,
                "variant": variant,
                "runs": len(group),
                "walls_s": [r["wall_s"] for r in group],
                **{k: m[k] for k in _FROM_MEDIAN_RUN},
            }
            for k in _MEDIANS:
                values = [r[k] for r in group if r.get(k) is not None]
                row[k] = round(statistics.median(values), 4) if values else None
                row[k + "_runs"] = values
            if any(r.get("merged_from") for r in group):
                row["merged_from"] = sorted({r["merged_from"] for r in group if r.get("merged_from")})
            rows.append(row)
    comparisons: dict[str, Any] = {}
    for case in CASES:

        def pick(variant: str, case: str = case) -> dict[str, Any] | None:
            group = by_key.get((case, variant))
            return _median_run(group) if group else None

        def med(variant: str, key: str, case: str = case) -> float | None:
            group = by_key.get((case, variant))
            values = [r[key] for r in group if r.get(key) is not None] if group else []
            return statistics.median(values) if values else None

        conc, seq, off = pick("concurrent"), pick("sequential"), pick("warm-off")
        c: dict[str, Any] = {}
        if conc and off:
            wall_on, wall_off = med("concurrent", "wall_s") or 0.0, med("warm-off", "wall_s") or 0.0
            c["warmup_wall_cost_s"] = round(wall_on - wall_off, 3)
            c["warmup_first_gap_s"] = [
                p["first_gap_s"] for p in conc["timeline"]["pieces"] if p["what"] == "fan-out"
            ]
            c["warm_off_first_gap_s"] = [
                p["first_gap_s"] for p in off["timeline"]["pieces"] if p["what"] == "fan-out"
            ]
            c["cost_warm_on_usd"] = conc["cost_usd"]
            c["cost_warm_off_usd"] = off["cost_usd"]
            c["cost_no_cache_usd"] = conc["cost_uncached_usd"]
            c["hit_ratio_warm_on"] = conc["sub_cache_hit_ratio"]
            c["hit_ratio_warm_off"] = off["sub_cache_hit_ratio"]
        traced, untraced = med("traced", "engine_cpu_s"), med("concurrent", "engine_cpu_s")
        if traced is not None and untraced:
            c["engine_cpu_untraced_s"] = round(untraced, 4)
            c["engine_cpu_traced_s"] = round(traced, 4)
            c["trace_cpu_overhead"] = round(traced / untraced - 1, 4)
            sink = med("traced", "trace_sink_cpu_s")
            if sink is not None:
                c["trace_sink_cpu_s"] = round(sink, 4)
                c["trace_sink_share_of_untraced_cpu"] = round(sink / untraced, 4)
        if conc and seq:
            c["sequential_over_concurrent_wall"] = round(seq["wall_s"] / conc["wall_s"], 2)
        elif conc and case in {k[0] for k in LONG}:
            # Extrapolated, not measured: this run's draws served one at a time, plus the
            # per-call overhead the 100-chunk sequential run measured over its own such bound.
            ref = pick("sequential", "count-1m")
            if ref is not None:
                per_call = (ref["wall_s"] - ref["bound_one_at_a_time_s"]) / max(1, ref["sub_calls"])
                estimate = conc["bound_one_at_a_time_s"] + per_call * conc["sub_calls"]
                c["sequential_wall_extrapolated_s"] = round(estimate, 1)
                c["sequential_extrapolation"] = (
                    "the concurrent run's own draws served one at a time (bound at 1 in flight) + "
                    f"{1e3 * per_call:.1f} ms per sub-call, the overhead count-1m/sequential measured"
                )
        if c:
            comparisons[case] = c
    return {"rows": rows, "comparisons": comparisons}


def print_table(summary: dict[str, Any], file: Any = sys.stdout) -> None:
    head = (
        f"{'case':10} {'variant':10} {'ok':>3} {'wall s':>7} {'bound s':>7} {'w/b':>5} {'sched':>5} "
        f"{'reqs':>5} {'infl':>4} {'prompt tok':>10} {'cached tok':>10} {'compl':>6} {'hit':>5} "
        f"{'$':>7} {'$ no-cache':>10} {'cpu ms/sub':>10} {'fan-out':>7} {'worker s':>8} {'sim s':>6} "
        f"{'RSS MB':>7} {'target':>6}"
    )
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in summary["rows"]:
        print(
            f"{r['case']:10} {r['variant']:10} {'yes' if r['correct'] else 'NO':>3} {r['wall_s']:7.2f} "
            f"{r['bound_s']:7.2f} {r['wall_over_bound']:5.2f} {r['wall_over_schedule_bound']:5.2f} "
            f"{r['requests']:5d} {r['peak_in_flight']:4d} {r['prompt_tokens']:10d} {r['cached_tokens']:10d} "
            f"{r['completion_tokens']:6d} {_fmt(r['sub_cache_hit_ratio'], '5.3f'):>5} {r['cost_usd']:7.4f} "
            f"{r['cost_uncached_usd']:10.4f} {_fmt(r['engine_cpu_ms_per_subcall'], '10.3f'):>10} "
            f"{_fmt(r['fanout_engine_cpu_ms_per_subcall'], '7.3f'):>7} {r['worker_cpu_s']:8.2f} "
            f"{r['sim_cpu_s']:6.2f} {r['peak_rss_mb']:7.1f} {r['rss_target_mb']:6.0f}"
            + ("  (merged)" if r.get("merged_from") else ""),
            file=file,
        )
    print(file=file)
    for case, c in summary["comparisons"].items():
        parts = []
        if "warmup_wall_cost_s" in c:
            parts.append(
                f"warm-up wall cost {c['warmup_wall_cost_s']:+.2f} s (median walls; 1st->2nd sub-call "
                f"{c['warmup_first_gap_s']} vs {c['warm_off_first_gap_s']} s warm-off); $ warm-on "
                f"{c['cost_warm_on_usd']:.4f} / warm-off {c['cost_warm_off_usd']:.4f} / "
                f"no cache {c['cost_no_cache_usd']:.4f}"
            )
        if "trace_cpu_overhead" in c:
            parts.append(
                f"tracing: engine CPU {c['engine_cpu_untraced_s']:.3f} -> {c['engine_cpu_traced_s']:.3f} s "
                f"({100 * c['trace_cpu_overhead']:+.1f}%; inside the sink "
                f"{c.get('trace_sink_cpu_s', 0):.3f} s = {100 * c.get('trace_sink_share_of_untraced_cpu', 0):.1f}%)"
            )
        if "sequential_over_concurrent_wall" in c:
            parts.append(f"one-at-a-time is {c['sequential_over_concurrent_wall']}x the concurrent wall")
        if "sequential_wall_extrapolated_s" in c:
            parts.append(f"one-at-a-time ~{c['sequential_wall_extrapolated_s']} s (EXTRAPOLATED, not run)")
        print(f"{case}: " + "; ".join(parts), file=file)


def markdown(result: dict[str, Any]) -> str:
    """The summary of a results file as a Markdown table, for the README."""
    summary = result["summary"]
    lines = [
        f"`{result['command']}` ({result['created']}, {result['machine']['cpus']} shared cores; "
        f"latency model `{result['latency_model'].get('name', 'bench')}`)",
        "",
        "| case | variant | correct | wall s | bound s | wall/bound | requests | peak in flight "
        "| prompt / cached / completion tokens | sub-prefix hit | $ | $ no cache | engine CPU ms/sub-call "
        "(fan-out window) | worker CPU s | sim CPU s | peak RSS MB (target) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        ratio = f"{r['wall_over_bound']:.2f}"
        if r["variant"] == "sequential":
            ratio += f" ({r['wall_over_schedule_bound']:.2f} of 1-at-a-time)"
        lines.append(
            f"| {r['case']} | {r['variant']}{' *' if r.get('merged_from') else ''} | "
            f"{'yes' if r['correct'] else 'NO'} | {r['wall_s']:.2f} | {r['bound_s']:.2f} | {ratio} | "
            f"{r['requests']} | {r['peak_in_flight']} | {r['prompt_tokens']:,} / {r['cached_tokens']:,} / "
            f"{r['completion_tokens']:,} | {_fmt(r['sub_cache_hit_ratio'], '.3f')} | {r['cost_usd']:.4f} | "
            f"{r['cost_uncached_usd']:.4f} | {_fmt(r['engine_cpu_ms_per_subcall'], '.2f')} "
            f"({_fmt(r['fanout_engine_cpu_ms_per_subcall'], '.2f')}) | {r['worker_cpu_s']:.2f} | "
            f"{r['sim_cpu_s']:.2f} | {r['peak_rss_mb']:.0f} ({r['rss_target_mb']:.0f}) |"
        )
    if any(r.get("merged_from") for r in summary["rows"]):
        lines += ["", "\\* measured by a separate run, merged from its results file."]
    lines.append("")
    for case, c in summary["comparisons"].items():
        parts = []
        if "warmup_wall_cost_s" in c:
            parts.append(
                f"warm-up costs {c['warmup_wall_cost_s']:+.2f} s of wall (median warm-on − warm-off); "
                f"$ {c['cost_warm_on_usd']:.4f} warm-on vs {c['cost_warm_off_usd']:.4f} warm-off "
                f"({c['cost_no_cache_usd']:.4f} with no cache hits)"
            )
        if "trace_cpu_overhead" in c:
            parts.append(
                f"tracing: engine CPU {100 * c['trace_cpu_overhead']:+.1f}% (A/B medians), "
                f"{100 * c.get('trace_sink_share_of_untraced_cpu', 0):.1f}% spent inside the sink"
            )
        if "sequential_over_concurrent_wall" in c:
            parts.append(f"one at a time takes {c['sequential_over_concurrent_wall']}× the concurrent wall")
        if "sequential_wall_extrapolated_s" in c:
            parts.append(f"one at a time ≈ {c['sequential_wall_extrapolated_s']} s (extrapolated, not run)")
        lines.append(f"- **{case}**: " + "; ".join(parts))
    return "\n".join(lines)


def print_timeline(run: dict[str, Any], file: Any = sys.stdout) -> None:
    print(
        f"\nwhere the wall time went: {run['case']}/{run['variant']} (wall {run['wall_s']} s, "
        f"bound {run['bound_s']} s)",
        file=file,
    )
    for p in run["timeline"]["pieces"]:
        if p["what"] == "gap":
            print(f"  gap (engine + worker, no request in the server)  {p['s']:7.3f} s", file=file)
        elif p["what"] == "root turn":
            print(
                f"  root turn                      {p['s']:7.3f} s  (model {p['modeled_s']:.3f} s)", file=file
            )
        else:
            print(
                f"  fan-out of {p['n']:4d}                {p['s']:7.3f} s  (bound {p['bound_s']:.3f} s)",
                file=file,
            )
            if p["warmup_s"]:
                modeled = p["warmup_modeled_s"]
                print(
                    f"    warm-up alone in the server  {p['warmup_s']:7.3f} s  (model {modeled:.3f} s)",
                    file=file,
                )
                print(f"    warm-up done -> next arrival {p['release_s']:7.3f} s", file=file)
            print(
                f"    arrivals of the rest spread  {p['followers_spread_s']:7.3f} s  "
                f"(most waiting to be read by the server {p['max_queue_and_body_s']:.3f} s)",
                file=file,
            )
            print(
                f"    last arrival -> last finish  {p['last_arrival_to_last_finish_s']:7.3f} s  "
                f"(sim lag over its draws: mean {p['sim_lag_mean_ms']:.0f} ms, "
                f"max {p['sim_lag_max_ms']:.0f} ms)",
                file=file,
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--one", help=argparse.SUPPRESS)  # run one spec in this process, print JSON
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--only", help="comma-separated case:variant pairs, instead of --cases x --variants")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--merge", nargs="*", default=[], help="result files whose runs join the summary")
    p.add_argument("--profile", help="directory for a cProfile of the engine process per run")
    p.add_argument("--timeout", type=float, default=480.0, help="seconds per run")
    p.add_argument("--markdown", help="print a results file's summary as a Markdown table; run nothing")
    p.add_argument(
        "--latency", choices=sorted(LATENCIES), default="bench", help="latency model (default bench)"
    )
    p.add_argument(
        "--loop",
        choices=("default", "asyncio", "uvloop"),
        default="default",
        help="the engine's event loop (default: the one rlm_async runs its own on, uvloop where installed)",
    )
    args = p.parse_args(argv)

    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text(encoding="utf-8"))))
        return 0
    if args.one:
        one: dict[str, Any] = json.loads(args.one)
        print(json.dumps(run_probe(one) if one.get("probe") else run_one(one)))
        return 0

    if args.only:
        plan = [tuple(pair.split(":", 1)) for pair in args.only.split(",")]
    else:
        plan = [(c, v) for c in args.cases.split(",") for v in args.variants.split(",") if (c, v) not in LONG]
    for c, v in plan:
        if c not in CASES or v not in VARIANTS:
            p.error(f"unknown case or variant {c}:{v}; cases {list(CASES)}, variants {list(VARIANTS)}")
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)

    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    for repeat in range(args.repeat):
        for c, v in plan:
            if v == "sequential" and repeat > 0:
                continue  # long and nearly deterministic: once
            spec: dict[str, Any] = {
                "case": c,
                "variant": v,
                "repeat": repeat,
                "seed": 0,
                "latency": args.latency,
                "loop": args.loop,
            }
            if args.profile:
                spec["profile"] = str(Path(args.profile) / f"{c}-{v}-{repeat}.txt")
            run = _spawn(spec, args.timeout)
            runs.append(run)
            print(
                f"[{time.monotonic() - started:6.1f}s] {c:10} {v:10} #{repeat} wall {run['wall_s']:7.2f} s  "
                f"bound {run['bound_s']:6.2f} s  cpu/sub {run['engine_cpu_ms_per_subcall']} ms  "
                f"load {run['load_avg_before']:.1f}",
                file=sys.stderr,
                flush=True,
            )
    probes = []
    for c in dict.fromkeys(c for c, _ in plan):
        probe = _spawn({"case": c, "probe": True, "seed": 0}, args.timeout)
        probes.append(probe)
        print(
            f"[{time.monotonic() - started:6.1f}s] {c:10} probe: {probe['prompts']} prompts "
            f"({probe['prompt_mb']:.1f} MB) built in {probe['build_only_wall_s']:.3f} s, handed to the "
            f"engine {probe['cell_start_to_request_s']:.3f} s after the cell started",
            file=sys.stderr,
            flush=True,
        )
    merged = list(runs)
    for path in args.merge:
        other = json.loads(Path(path).read_text(encoding="utf-8"))
        for r in other["runs"]:
            r["merged_from"] = str(Path(path).relative_to(ROOT) if Path(path).is_absolute() else path)
            merged.append(r)
    summary = summarize(merged)
    print_table(summary)
    for case in CASES:
        group = [r for r in runs if r["case"] == case and r["variant"] == "concurrent"]
        if group:
            print_timeline(_median_run(group))
    if probes:
        print("\nbefore the first request of a fan-out (REPL worker + control channel, no HTTP):")
        for probe in probes:
            print(
                f"  {probe['case']:10} {probe['prompts']:5d} prompts, {probe['prompt_mb']:5.1f} MB: built in "
                f"{probe['build_only_wall_s']:.3f} s; llm_batch reaches the engine after "
                f"{probe['cell_start_to_request_s']:.3f} s; whole cell with instant answers "
                f"{probe['with_llm_batch_wall_s']:.3f} s (engine CPU {probe['with_llm_batch_engine_cpu_s']:.3f} s)"
            )

    result = {
        **provenance(
            "fanout.py", argv, note="shared machine: other processes ran alongside (see load_avg_* per run)"
        ),
        "latency_model": {
            "name": args.latency,
            "root": dataclasses.asdict(LATENCIES[args.latency].root),
            "sub": dataclasses.asdict(LATENCIES[args.latency].sub),
        },
        "prices_usd_per_mtok": {m: dataclasses.asdict(p) for m, p in DEMO_PRICES.items()},
        "cache_settings": {"warm-on": dataclasses.asdict(CacheSettings()), "warm-off": {"warm": False}},
        "targets": {
            # issue 12
            "wall_over_bound_at_1000_chunks": 1.10,
            "wall_over_bound_at_5000_chunks": 1.25,
            "engine_cpu_ms_per_subcall": 0.5,
            "peak_rss_mb_at_10m": "2.5 x context + 150 MB",
            "trace_cpu_overhead": 0.05,
        },
        "summary": summary,
        "probes": probes,
        "runs": runs,
    }
    if args.merge:
        result["merged"] = args.merge
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
