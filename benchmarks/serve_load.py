"""Load test of `rlm-async serve` with locust (headless, loopback only, bounded in count and
time): N concurrent queries against one query alone, with the worker pool on and off.

    .venv/bin/python benchmarks/serve_load.py [--users 100] [--pool 100,0] [--repeat 1] [--sim process]
        [--tokens 100K] [--chunks 20] [--run-time 300] [--no-trace] [--out benchmarks/results/serve_load.json]

Starts the server on 127.0.0.1 (port 0) on the simulator with the bundled latencies (root
0.4 s + 4 ms/token, sub 0.3 s + 4 ms/token; configs/sim.toml), by default in a process of
its own as a model server would be (`--sim inline`: inside the server's), uploads one
COUNT (OOLONG-like counting) context per user with `POST /v1/files`, times one query
alone, waits until the worker pool is full (`/metrics`), then runs locust: `--users` users
spawned at once, each sending one chat completion naming its file (`rlm.file_id`),
checking the answer against the workload's truth, and stopping. Each `--pool` size is one
fresh server; sizes alternate within each repeat, so A and B see the same machine load.

Figures per run: `ratio` = aggregate wall (first request sent -> last answer back) / the
wall of the one query alone (target <= 1.2 at 100 users), errors, answers right, and the
server process's CPU time (user + system, its own threads: engine, HTTP, the in-process
simulator; not the REPL workers) per query, for the burst and for the query alone; the
load average before and after. The summary gives medians over repeats. Exit 1 on any
error or wrong answer.

The server writes a trace per query (`serve --trace`), which the breakdown of each query's
time is read from (medians over the burst, and the pieces of its last query to finish, the
one that sets the aggregate wall); that costs it about 1 ms of CPU per query. `--no-trace`
runs it as it is deployed by default, untraced, with no breakdown.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
from _provenance import provenance
from _serve_breakdown import CpuSampler, format_table, medians, query_pieces, sim_pieces

from rlm_async.sim import SimConfig, SimProcess
from rlm_async.workloads import oolong_counting, parse_size

HERE = Path(__file__).parent
RESULTS = HERE / "results"
ROOT = HERE.parent


def _config(chunks: int, users: int, pool: int, sim_url: str | None = None) -> str:
    base = (ROOT / "configs" / "sim.toml").read_text()
    base = re.sub(r"chunks = \d+", f"chunks = {chunks}", base)
    if sim_url is not None:  # the simulator in its own process, where a model server would be
        base = base.replace('base_url = "sim"', f'base_url = "{sim_url}"')
    base = re.sub(r"max_workers = \d+", f"max_workers = {max(users, 100)}", base)
    serve = f"max_running = {users}\nmax_queued = {users}\nworker_pool = {pool}\n"
    return f"[serve]\n{serve}\n" + base


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return None


def _loop_lag(text: str) -> dict[str, float] | None:
    """The server's `rlm_event_loop_lag_seconds` histogram from a scrape: cumulative counts by
    bucket bound (`le`), with `sum` and `count`; None from a server without it."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("rlm_event_loop_lag_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[le] = float(line.split()[-1])
        elif line.startswith(("rlm_event_loop_lag_seconds_sum ", "rlm_event_loop_lag_seconds_count ")):
            out[line.split()[0].rsplit("_", 1)[1]] = float(line.split()[-1])
    return out or None


def _lag_over_burst(
    before: dict[str, float] | None, after: dict[str, float] | None
) -> dict[str, float] | None:
    """The probe's wake-ups during the burst: how many, how many over 10 and 50 ms late,
    their lateness summed (about the time the loop ran behind), and the bucket bound the
    latest one was under."""
    if before is None or after is None:
        return None
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    bounds = sorted((float(k), v) for k, v in delta.items() if k not in ("sum", "count", "+Inf"))
    return {
        "latest_at_most_s": next((b for b, n in bounds if n == delta["+Inf"]), float("inf")),
        "wakeups": delta["count"],
        "late_over_10ms": delta["+Inf"] - delta["0.01"],
        "late_over_50ms": delta["+Inf"] - delta["0.05"],
        "lag_sum_s": round(delta["sum"], 3),
    }


def _gc_counts(text: str) -> dict[str, float] | None:
    """The server's garbage collector counters from a scrape, `collections_<g>` and
    `seconds_<g>` by generation; None from a server without them."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        for name, key in (("rlm_gc_collections_total", "collections"), ("rlm_gc_seconds_total", "seconds")):
            if line.startswith(name + '{generation="'):
                generation = line.split('"', 2)[1]
                out[f"{key}_{generation}"] = float(line.split()[-1])
    return out or None


def _gc_over_burst(
    before: dict[str, float] | None, after: dict[str, float] | None
) -> dict[str, float] | None:
    """Collections in the server during the burst (and the scrape after it): full ones, and
    the seconds its loop stood still for them and for all."""
    if before is None or after is None:
        return None
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    return {
        "full_collections": delta["collections_2"],
        "full_collections_s": round(delta["seconds_2"], 3),
        "all_collections_s": round(sum(v for k, v in delta.items() if k.startswith("seconds_")), 3),
    }


def _wait_pool_full(c: httpx.Client, pool: int, timeout_s: float = 120.0) -> float:
    """Seconds until the server reports `pool` idle pre-started workers."""
    t0 = time.monotonic()
    while pool and time.monotonic() - t0 < timeout_s:
        if (_metric(c.get("/metrics").text, "rlm_worker_pool_idle") or 0) >= pool:
            break
        time.sleep(0.1)
    return time.monotonic() - t0


def _start(
    config_path: Path,
    log: Path,
    trace_dir: Path | None,
    code: Path | None = None,
    python: str = sys.executable,
) -> tuple[subprocess.Popen[bytes], str]:
    """The server, from this checkout or from the rlm_async source tree `code` (another
    version's, for an A/B in one run: it runs in that directory, so `-m` imports its
    package first); with `trace_dir`, traced (if that version has `serve --trace`)."""
    env = {k: v for k, v in os.environ.items() if k != "RLM_SERVE_KEYS"}
    argv = [python, "-m", "rlm_async.cli", "serve", "--config", str(config_path), "--port", "0"]
    src = code or ROOT
    if trace_dir is not None and "trace_dir" in (src / "rlm_async" / "serve" / "_config.py").read_text():
        argv += ["--trace", str(trace_dir)]
    with open(log, "wb") as stderr:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            cwd=src,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = re.search(r"listening on (http://\S+)/v1", log.read_text(errors="replace"))
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("the server did not start")


def _profilers(
    directory: Path | None, pids: dict[str, int | None], pool: int
) -> list[subprocess.Popen[bytes]]:
    """py-spy (if installed: `pip install py-spy`) sampling each process during the burst,
    writing collapsed stacks (`DIR/<name>-pool<N>-<pid>.txt`, one line per stack and its
    sample count), which `profile_summary` sums by function after the run."""
    if directory is None:
        return []
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        print(
            f"--profile: no py-spy beside {sys.executable} (pip install py-spy); not profiling",
            file=sys.stderr,
        )
        return []
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, pid in pids.items():
        if pid is None:
            continue
        path = directory / f"{name}-pool{pool}-{pid}.txt"
        # --nonblocking: read the stacks without pausing the process, which would slow the burst.
        argv = [str(spy), "record", "--pid", str(pid), "--format", "raw", "--rate", "100", "--nonblocking"]
        argv += ["--output", str(path)]
        out.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(0.5)  # attached before the first request
    return out


def profile_summary(path: Path, top: int = 25) -> str:
    """A py-spy raw file summed by function: the share of samples with it on the stack
    (inclusive) and at the top (self), the `top` largest of each."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        # A frame reads "function (path/file.py:line)": keep file and function.
        names = [re.sub(r"^(.*) \((?:.*/)?([^/]+):\d+\)$", r"\2:\1", f) for f in stack.split(";")]
        inclusive.update({name: n for name in set(names)})
        own[names[-1]] += n
    lines = [f"{path.name}: {total} samples"]
    for title, counts in (("inclusive", inclusive), ("self", own)):
        lines.append(f"  {title}:")
        lines += [f"  {100 * k / max(total, 1):5.1f}% {name}" for name, k in counts.most_common(top)]
    return "\n".join(lines)


def _sim_process(chunks: int, code: Path | None = None) -> SimProcess:
    """The simulator configs/sim.toml describes (its [sim] table, `chunks` replaced), in a
    child process of its own, run from the source tree `code` (default: this checkout), as
    the server is: an A/B of two trees compares their simulators too."""
    return SimProcess(_sim_config(chunks), source=code)


def run(
    users: int,
    tokens: int,
    chunks: int,
    run_time: int,
    workdir: Path,
    pool: int = 0,
    sim: str = "process",
    code: Path | None = None,
    profile: Path | None = None,
    trace: bool = True,
    python: str = sys.executable,
) -> dict[str, Any]:
    """One fresh server (run by `python`), one query alone, then the burst. `sim`: "process" (the simulator
    in a child process of its own, as a model server would be: the server's CPU is then the
    service's own) or "inline" (in the server's process, as `rlm-async serve` runs it with
    no config). `trace`: the server writes a trace per query (`serve --trace`), which the
    breakdown of where each query's time went is read from."""
    with contextlib.ExitStack() as stack:
        sim_proc = None
        if sim == "process":
            sim_proc = stack.enter_context(_sim_process(chunks, code))
        result = _run(users, tokens, chunks, run_time, workdir, pool, sim_proc, code, profile, trace, python)
        if sim_proc is not None:
            t0, t1 = result.pop("_burst_window")
            result["simulator"] = sim_pieces(sim_proc.read_log().entries, t0, t1)
    result.pop("_burst_window", None)
    result["sim"] = sim
    return result


def _sim_config(chunks: int) -> SimConfig:
    table = tomllib.loads((ROOT / "configs" / "sim.toml").read_text())["sim"]
    table["policies"]["root"]["chunks"] = chunks
    return SimConfig.from_dict(table)


def _run(
    users: int,
    tokens: int,
    chunks: int,
    run_time: int,
    workdir: Path,
    pool: int,
    sim: SimProcess | None,
    code: Path | None,
    profile: Path | None = None,
    trace: bool = True,
    python: str = sys.executable,
) -> dict[str, Any]:
    sim_url = sim.base_url if sim is not None else None
    config_path = workdir / "serve.toml"
    config_path.write_text(_config(chunks, users, pool, sim_url))
    trace_dir = workdir / "traces" if trace else None
    proc, root = _start(config_path, workdir / "server.log", trace_dir, code, python)
    try:
        workloads = [oolong_counting(tokens, seed=i) for i in range(users + 1)]
        plan = []
        with httpx.Client(base_url=root, timeout=600) as c:
            for w in workloads:
                assert isinstance(w.context, str)
                r = c.post("/v1/files", content=w.context.encode(), headers={"content-type": "text/plain"})
                r.raise_for_status()
                plan.append({"file_id": r.json()["id"], "query": w.query, "truth": w.truth})
            # One query alone (its own context, not one of the load's).
            alone = plan.pop()
            _wait_pool_full(c, pool)
            cpu_alone0 = _cpu_s(proc.pid)
            t0 = time.monotonic()
            r = c.post(
                "/v1/chat/completions",
                json={
                    "model": "rlm",
                    "messages": [{"role": "user", "content": alone["query"]}],
                    "rlm": {"file_id": alone["file_id"]},
                },
            )
            t1 = time.monotonic()
            single_wall = t1 - t0
            cpu_alone = _cpu_s(proc.pid) - cpu_alone0
            r.raise_for_status()
            alone_record = {
                "started_mono": t0,
                "finished_mono": t1,
                "query_id": r.json()["rlm"].get("query_id"),
            }
            single_ok = str(alone["truth"]) in r.json()["choices"][0]["message"]["content"]
            pool_wait_s = _wait_pool_full(c, pool)  # refilled after the query alone
            scrape = c.get("/metrics").text
            lag_before, gc_before = _loop_lag(scrape), _gc_counts(scrape)
        load_burst = os.getloadavg()
        plan_path, out_path = workdir / "plan.json", workdir / "results.jsonl"
        plan_path.write_text(json.dumps(plan))
        env = {**os.environ, "RLM_LOAD_PLAN": str(plan_path), "RLM_LOAD_OUT": str(out_path)}
        locust = [
            str(Path(sys.executable).with_name("locust")),
            "-f", str(HERE / "_locustfile.py"),
            "--headless", "--users", str(users), "--spawn-rate", str(users),
            "--host", root, "--run-time", f"{run_time}s", "--stop-timeout", "10",
            "--only-summary", "--json-file", str(workdir / "locust"),
        ]  # fmt: skip
        sampler = CpuSampler(server=proc.pid, sim=sim.pid if sim is not None else None, interval_s=0.2)
        cpu0 = _cpu_s(proc.pid)
        burst0 = time.monotonic()
        sampler.start()
        spies = _profilers(profile, {"server": proc.pid, "simulator": sim.pid if sim else None}, pool)
        lp_proc = subprocess.Popen(locust, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            _, lp_err = lp_proc.communicate(timeout=run_time + 60)
        finally:
            sampler.stop()
            for spy in spies:
                spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                spy.wait(timeout=60)
        burst1 = time.monotonic()
        cpu_burst = _cpu_s(proc.pid) - cpu0  # the tail after the last answer is small
        cpu_report = sampler.report(locust=lp_proc.pid)
        records = (
            [json.loads(line) for line in out_path.read_text().splitlines()] if out_path.exists() else []
        )
        with httpx.Client(base_url=root, timeout=10) as c:
            scraped_at = time.monotonic()
            metrics = c.get("/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    sim_cfg = _sim_config(chunks)
    alone_pieces = (
        query_pieces(trace_dir / f"{alone_record['query_id']}.jsonl", sim_cfg, alone_record)
        if alone_record["query_id"] and trace_dir is not None
        else None
    )
    burst_rows = [
        p
        for r in records
        if r.get("query_id")
        and trace_dir is not None
        and (p := query_pieces(trace_dir / f"{r['query_id']}.jsonl", sim_cfg, r)) is not None
    ]
    # The query whose answer came back last sets the aggregate wall: its pieces beside the
    # medians say whether the burst's tail is one slow piece or a late start.
    last = max(records, key=lambda r: r["finished"]) if records else None
    last_pieces = (
        query_pieces(trace_dir / f"{last['query_id']}.jsonl", sim_cfg, last)
        if last is not None and last.get("query_id") and trace_dir is not None
        else None
    )
    ok = [r for r in records if r.get("status_code") == 200]
    aggregate = (max(r["finished"] for r in records) - min(r["started"] for r in records)) if records else 0.0
    walls = [r["finished"] - r["started"] for r in records]
    return {
        "pool": pool,
        "users": users,
        "tokens": tokens,
        "chunks": chunks,
        "single_wall_s": single_wall,
        "single_correct": single_ok,
        "aggregate_wall_s": aggregate,
        "ratio": aggregate / single_wall if single_wall else None,
        "requests": len(records),
        "errors": len(records) - len(ok) + (users - len(records)),
        "correct": sum(1 for r in ok if r.get("correct")),
        "query_wall_median_s": statistics.median(walls) if walls else None,
        "query_wall_max_s": max(walls) if walls else None,
        "server_cpu_ms_per_query": 1000 * cpu_burst / users,
        "server_cpu_ms_alone": 1000 * cpu_alone,
        "pool_fill_wait_s": pool_wait_s,
        "pooled_workers": _metric(metrics, "rlm_sandbox_workers_pooled_total"),
        "pool_misses": _metric(metrics, "rlm_worker_pool_misses"),
        "loadavg_at_burst": load_burst,
        "cpu_burst": cpu_report,
        "pieces_alone": alone_pieces,
        "pieces_burst_median": medians(burst_rows) if burst_rows else None,
        "pieces_burst_last": last_pieces,
        "client_send_spread_s": (max(r["started"] for r in records) - min(r["started"] for r in records))
        if records
        else None,
        "pieces_traced": len(burst_rows),
        "server_traced": trace_dir is not None,
        "_burst_window": (burst0, burst1),
        "locust_exit": lp_proc.returncode,
        "locust_stderr_tail": lp_err.decode(errors="replace")[-1500:],
        "loop_lag_burst": _lag_over_burst(lag_before, _loop_lag(metrics)),
        "gc_burst": _gc_over_burst(gc_before, _gc_counts(metrics)),
        "scrape_after_last_answer_s": round(scraped_at - max(r["finished_mono"] for r in records), 3)
        if records
        else None,
        "metrics_429_sent": next(
            (line.split()[-1] for line in metrics.splitlines() if line.startswith("rlm_http_429_sent_total")),
            None,
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--pool", default="100,0", help="[serve] worker_pool sizes to alternate (0: off)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of the A/B alternation")
    p.add_argument(
        "--sim",
        choices=("process", "inline"),
        default="process",
        help="the simulator in its own process (default) or inside the server's",
    )
    p.add_argument("--tokens", default="100K")
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--run-time", type=int, default=300, help="locust's bound, seconds")
    p.add_argument("--out", default=str(RESULTS / "serve_load.json"))
    p.add_argument(
        "--no-trace",
        action="store_true",
        help="run the server untraced, as deployed by default (no per-query breakdown)",
    )
    p.add_argument(
        "--profile",
        default=None,
        help="a directory: py-spy (if installed) samples the server and the simulator during each burst",
    )
    p.add_argument(
        "--code",
        default="here",
        help="comma-separated rlm_async source trees to alternate with each pool size "
        "('here': this checkout), e.g. here,/tmp/base for an A/B against `git archive BASE`; "
        "the server and the simulator's process run from that tree; "
        "TREE@PYTHON runs that tree's server with another interpreter (whose environment has "
        "rlm_async's dependencies), e.g. here,here@/tmp/venv312/bin/python",
    )
    args = p.parse_args(argv)
    pools = [int(x) for x in args.pool.split(",")]
    codes = args.code.split(",")
    load0 = os.getloadavg()
    runs: list[dict[str, Any]] = []
    variants = [(pool, code) for pool in pools for code in codes]
    for rep in range(args.repeat):
        for pool, code in variants:
            tree, _, python = code.partition("@")
            with tempfile.TemporaryDirectory(prefix="rlm-load-") as tmp:
                r = run(
                    args.users,
                    parse_size(args.tokens),
                    args.chunks,
                    args.run_time,
                    Path(tmp),
                    pool,
                    args.sim,
                    None if tree == "here" else Path(tree).resolve(),
                    Path(args.profile) if args.profile else None,
                    trace=not args.no_trace,
                    python=python or sys.executable,
                )
            r["repeat"] = rep
            r["code"] = code
            runs.append(r)
            print(
                f"\n### pool={pool} code={r['code']} rep={rep}: ratio {r['ratio']:.2f}, "
                f"load {r['loadavg_at_burst'][0]:.1f}"
            )
            if r["pieces_burst_median"] is not None:
                print(
                    format_table(
                        r["pieces_alone"], r["pieces_burst_median"], r["cpu_burst"], r["pieces_burst_last"]
                    )
                )
                print(
                    f"locust's users began their requests within {r['client_send_spread_s']:.3f} s "
                    "(stamped before locust builds and sends each)"
                )
            if args.profile:
                for path in sorted(Path(args.profile).glob(f"*-pool{pool}-*.txt")):
                    print(profile_summary(path))
            for kind, sp in (r.get("simulator") or {}).items():
                print(
                    f"simulator, {kind} requests in the burst: {sp['requests']}, its lag over the model "
                    f"median {sp['lag_median_ms']:.0f} ms (max {sp['lag_max_ms']:.0f}), arrival -> service "
                    f"median {sp['arrival_to_service_median_ms']:.0f} ms (max {sp['arrival_to_service_max_ms']:.0f}), "
                    f"most in flight {sp['in_flight_max']}"
                )
            if (lag := r["loop_lag_burst"]) is not None:
                print(
                    f"server event loop in the burst (a probe every 50 ms): {lag['wakeups']:.0f} wake-ups, "
                    f"{lag['late_over_10ms']:.0f} over 10 ms late, {lag['late_over_50ms']:.0f} over 50 ms, "
                    f"{lag['lag_sum_s']:.2f} s late in all, the latest at most {lag['latest_at_most_s']:g} s"
                )
            if (gcb := r["gc_burst"]) is not None:
                print(
                    f"server garbage collection in the burst: {gcb['full_collections']:.0f} full "
                    f"({1000 * gcb['full_collections_s']:.0f} ms), {1000 * gcb['all_collections_s']:.0f} ms in all "
                    f"(these and the loop's figures: until a scrape {r['scrape_after_last_answer_s']:.2f} s "
                    "after the last answer)"
                )
            print()
            print(
                f"  pool={pool} code={r['code']} rep={rep}: ratio {r['ratio']:.2f} ({r['aggregate_wall_s']:.2f} / "
                f"{r['single_wall_s']:.2f} s), {r['correct']}/{r['users']} right, {r['errors']} errors, "
                f"server CPU {r['server_cpu_ms_per_query']:.1f} ms/query, load {r['loadavg_at_burst'][0]:.1f}",
                file=sys.stderr,
            )
    print(
        "| worker pool | code | users | runs | one query alone s | aggregate wall s | ratio | errors | right "
        "| median query s | server CPU ms/query (burst) | server CPU ms (alone) | load average |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    summary: dict[str, Any] = {}
    for pool, label in variants:
        mine = [r for r in runs if r["pool"] == pool and r["code"] == label]

        def med(key: str, rows: list[dict[str, Any]] = mine) -> float:
            return statistics.median(float(r[key] or 0.0) for r in rows)

        summary[str(pool) if len(codes) == 1 else f"{pool} {label}"] = {
            k: med(k)
            for k in (
                "single_wall_s",
                "aggregate_wall_s",
                "ratio",
                "query_wall_median_s",
                "server_cpu_ms_per_query",
                "server_cpu_ms_alone",
            )
        }
        loads = [r["loadavg_at_burst"][0] for r in mine]
        print(
            f"| {pool} | {label} | {args.users} | {len(mine)} | {med('single_wall_s'):.2f} | {med('aggregate_wall_s'):.2f} "
            f"| {med('ratio'):.2f} | {sum(r['errors'] for r in mine)} "
            f"| {sum(r['correct'] for r in mine)}/{args.users * len(mine)} | {med('query_wall_median_s'):.2f} "
            f"| {med('server_cpu_ms_per_query'):.1f} | {med('server_cpu_ms_alone'):.0f} "
            f"| {min(loads):.1f}-{max(loads):.1f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                **provenance("serve_load.py", argv, loadavg_before=load0, loadavg_after=os.getloadavg()),
                "medians_by_pool": summary,
                "runs": runs,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}", file=sys.stderr)
    ok = all(r["errors"] == 0 and r["correct"] == r["users"] for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
