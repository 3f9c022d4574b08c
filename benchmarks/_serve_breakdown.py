"""Where a burst of served queries spends its time and its CPU (`benchmarks/serve_load.py`).

Two accounts, both over the burst (locust's first request to its last answer):

* **CPU of every process**, against what 2 cores x the wall offered: the server (engine,
  HTTP), the simulator's process, the REPL workers (bubblewrap and the interpreter inside),
  locust, and everything else on the machine (other users' work), from `/proc/stat`.
  `CpuSampler` reads `/proc/<pid>/stat` of every process every `interval_s` and keeps, per
  process (pid and start time), the last CPU time it saw: a process that exits between two
  samples loses at most one interval of CPU (the workers are idle in their last moments:
  waiting for the final answer to be read), so the workers' figure is a floor.

* **Each query's latency**, from the server's JSONL traces (`rlm-async serve --trace`),
  the simulator's request log and the client's clock, all on CLOCK_MONOTONIC (one clock
  for every process of the machine): the request's way in (HTTP, admission, the context
  file read), the worker (slot, hand-out from the pool, the context sent to it), each root
  turn against the latency the simulator's model gives it, each cell (the fan-out against
  its bound: its slowest sub-call's modeled latency), the worker's kill, the engine's gaps
  between those, and the answer's way out. Medians over the burst's queries, and the same
  for the query alone.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rlm_async._events import (
    CallFinish,
    CallStart,
    CellFinish,
    CellStart,
    QueryFinish,
    QueryStart,
    WorkerKill,
    WorkerSlotWait,
    WorkerStart,
)
from rlm_async._trace import load_trace
from rlm_async.sim import SimConfig
from rlm_async.sim._log import LogEntry

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: str) -> tuple[int, int, str, float] | None:
    """(ppid, start time in ticks, comm, user + system CPU seconds) of one process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    comm = raw[raw.find("(") + 1 : raw.rfind(")")]
    fields = raw[raw.rfind(")") + 2 :].split()
    return int(fields[1]), int(fields[19]), comm, (int(fields[11]) + int(fields[12])) / _TICK


def _busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (every core; iowait and idle out)."""
    with open("/proc/stat") as f:
        cpu = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in cpu[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


class CpuSampler:
    """Samples every process's CPU time in a thread, between `start()` and `stop()`;
    `report()` groups what each used during that window."""

    def __init__(self, *, server: int, sim: int | None, interval_s: float = 0.1) -> None:
        self.server, self.sim = server, sim
        self.interval_s = interval_s
        self._first: dict[tuple[int, int], float] = {}
        self._last: dict[tuple[int, int], float] = {}
        self._parent: dict[int, int] = {}
        self._comm: dict[tuple[int, int], str] = {}
        self._initial: set[tuple[int, int]] = set()
        """Processes alive at the first sample (the pool's pre-started workers, say)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._snapshots: list[tuple[float, float, dict[tuple[int, int], float]]] = []
        """(time, machine busy s, every process's CPU s then): the timeline."""
        self._t0 = self._t1 = 0.0
        self._busy0 = self._busy1 = 0.0
        self._own0 = self._own1 = 0.0
        self.samples = 0

    def _sample(self, *, first: bool) -> None:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            got = _stat(name)
            if got is None:
                continue
            ppid, started, comm, cpu = got
            key = (int(name), started)
            self._parent.setdefault(key[0], ppid)  # the first seen: a killed sandbox's re-parent later
            self._comm[key] = comm
            if first:
                self._first[key] = cpu
                self._initial.add(key)
            elif key not in self._first:
                self._first[key] = 0.0  # born during the window: all its CPU counts
            self._last[key] = cpu
        self.samples += 1
        self._snapshots.append((time.monotonic(), _busy_s(), dict(self._last)))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample(first=False)

    def start(self) -> None:
        self._t0, self._busy0 = time.monotonic(), _busy_s()
        self._own0 = time.thread_time()
        self._sample(first=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(first=False)
        self._t1, self._busy1 = time.monotonic(), _busy_s()

    def _descends(self, pid: int, ancestor: int) -> bool:
        seen = 0
        while pid > 1 and seen < 64:
            if pid == ancestor:
                return True
            pid = self._parent.get(pid, 0)
            seen += 1
        return False

    def _group(self, pid: int, locust: int | None) -> str:
        if pid == self.server:
            return "server"
        if self.sim is not None and pid == self.sim:
            return "simulator"
        if self._descends(pid, self.server):
            return "workers"
        if locust is not None and self._descends(pid, locust):
            return "locust"
        if pid == os.getpid():
            return "benchmark"
        return "other"

    def timeline(self, *, locust: int | None, step_s: float = 0.5) -> list[dict[str, float]]:
        """Cores used per group in each `step_s` of the window (and the whole machine's)."""
        out: list[dict[str, float]] = []
        if not self._snapshots:
            return out
        groups = {key: self._group(key[0], locust) for key in self._last}
        t_prev, busy_prev, cpu_prev = self._snapshots[0]
        for t, busy, cpu in self._snapshots[1:]:
            if t - t_prev < step_s and (t, busy, cpu) != self._snapshots[-1]:
                continue
            dt = t - t_prev
            row = {"t": t_prev - self._t0, "machine": (busy - busy_prev) / dt}
            for key, value in cpu.items():
                before = cpu_prev.get(key, self._first.get(key, 0.0))
                group = groups.get(key, "other")
                row[group] = row.get(group, 0.0) + max(0.0, value - before) / dt
            out.append(row)
            t_prev, busy_prev, cpu_prev = t, busy, cpu
        return out

    def report(self, *, locust: int | None) -> dict[str, Any]:
        """CPU seconds per group over the window, the window's wall and the machine's busy
        seconds. Workers: the server's descendants, by the parent each process had when
        first seen (a killed sandbox's processes are re-parented away)."""
        groups = dict.fromkeys(("server", "simulator", "workers", "locust", "benchmark", "other"), 0.0)
        counts = dict.fromkeys(groups, 0)
        # Workers split by birth: those alive when the window opened (pre-started, then
        # handed out: their start-up was paid before) and those born in it (pool refills,
        # or starts on demand: a whole start-up each).
        born = {"workers_alive_at_start": 0.0, "workers_born_in_window": 0.0}
        born_counts = dict.fromkeys(born, 0)
        for key, last in self._last.items():
            used = max(0.0, last - self._first.get(key, 0.0))
            group = self._group(key[0], locust)
            groups[group] += used
            counts[group] += 1 if used > 0 else 0
            if group == "workers":
                part = "workers_alive_at_start" if key in self._initial else "workers_born_in_window"
                born[part] += used
                born_counts[part] += 1 if used > 0 else 0
        wall = self._t1 - self._t0
        return {
            "wall_s": wall,
            "available_cpu_s": wall * (os.cpu_count() or 1),
            "machine_busy_cpu_s": self._busy1 - self._busy0,
            "cpu_s": groups,
            "processes_with_cpu": counts,
            "workers_by_birth_cpu_s": born,
            "workers_by_birth_processes": born_counts,
            "samples": self.samples,
            "timeline_cores": self.timeline(locust=locust),
        }


# ------------------------------------------------------------------ per-query latency


def _modeled(sim: SimConfig, kind: str, finish: CallFinish) -> float:
    return sim.latency.latency(
        kind,
        prompt_tokens=finish.prompt_tokens,
        completion_tokens=finish.completion_tokens,
        cached_tokens=finish.cached_tokens,
    )


def query_pieces(path: Path, sim: SimConfig, client: Mapping[str, float] | None) -> dict[str, float] | None:
    """One query's latency, piece by piece (seconds), from its trace; `client` the locust
    record's `started_mono`/`finished_mono` (None: the query alone, timed by the benchmark,
    whose record has them too)."""
    events = load_trace(path).events
    qs = next((e for e in events if isinstance(e, QueryStart)), None)
    qf = next((e for e in events if isinstance(e, QueryFinish)), None)
    if qs is None or qf is None:
        return None
    out: dict[str, float] = {}
    starts: dict[str, CallStart] = {e.call_id: e for e in events if isinstance(e, CallStart)}
    root_s = root_model = 0.0
    subs: list[tuple[float, float, float, float]] = []  # (start, end, modeled, engine latency)
    root_turns = 0
    for e in events:
        if isinstance(e, CallFinish) and e.call_id in starts:
            start = starts[e.call_id]
            if start.call_kind == "sub":
                subs.append((start.time, e.time, _modeled(sim, "sub", e), e.latency_s))
            else:
                root_turns += 1
                root_s += e.latency_s
                root_model += _modeled(sim, "root", e)
    cells = [e for e in events if isinstance(e, CellFinish)]
    cell_starts = [e for e in events if isinstance(e, CellStart)]
    fan_s = fan_bound = other_cells = 0.0
    fan: dict[str, float] = {}
    for cs, cf in zip(cell_starts, cells, strict=False):
        inside = sorted(c for c in subs if cs.time <= c[0] <= cf.time)
        if not inside:
            other_cells += cf.duration_s
            continue
        fan_s += cf.duration_s
        fan_bound += max(c[2] for c in inside)
        # The engine's warm-up sends one sub-call alone, the rest once it answered.
        warm = inside[0] if len(inside) == 1 or inside[1][0] >= inside[0][1] else None
        rest = inside[1:] if warm is not None else inside

        def add(key: str, value: float) -> None:
            fan[key] = fan.get(key, 0.0) + value

        add("fan_first_send_s", inside[0][0] - cs.time)
        if warm is not None:
            add("fan_warmup_s", warm[3])
            add("fan_warmup_model_s", warm[2])
            add("fan_warmup_to_rest_s", rest[0][0] - warm[1] if rest else 0.0)
        if rest:
            add("fan_rest_send_spread_s", rest[-1][0] - rest[0][0])
            add("fan_rest_slowest_s", max(c[1] for c in rest) - rest[0][0])
            add("fan_rest_slowest_model_s", max(c[2] for c in rest))
            add("fan_rest_latency_median_s", statistics.median(c[3] for c in rest))
        add("fan_last_answer_to_cell_end_s", cf.time - max(c[1] for c in inside))
    slot = sum(e.waited_s for e in events if isinstance(e, WorkerSlotWait))
    worker = sum(e.duration_s for e in events if isinstance(e, WorkerStart))
    kill = next((e for e in events if isinstance(e, WorkerKill)), None)
    kill_s = qf.time - kill.time if kill is not None else 0.0
    wall = qf.time - qs.time
    out["engine_wall_s"] = wall
    out["slot_wait_s"] = slot
    out["worker_handout_s"] = worker
    out["root_turns"] = float(root_turns)
    out["root_calls_s"] = root_s
    out["root_calls_model_s"] = root_model
    out["fanout_cells_s"] = fan_s
    out["fanout_bound_s"] = fan_bound
    out["other_cells_s"] = other_cells
    out.update(fan)
    out["kill_to_finish_s"] = kill_s
    out["engine_gaps_s"] = wall - slot - worker - root_s - fan_s - other_cells - kill_s
    if client is not None and "started_mono" in client:
        out["request_in_s"] = qs.time - client["started_mono"]
        out["answer_out_s"] = client["finished_mono"] - qf.time
        out["client_wall_s"] = client["finished_mono"] - client["started_mono"]
    return out


def sim_pieces(entries: Iterable[LogEntry], t0: float, t1: float) -> dict[str, Any]:
    """The simulator's side of the requests that arrived in [t0, t1]: its own lag (service
    time over the model's), by kind; medians and the largest."""
    out: dict[str, Any] = {}
    for kind in ("root", "sub"):
        rows = [e for e in entries if e.kind == kind and t0 <= e.arrival <= t1 and e.start is not None]
        if not rows:
            continue
        lag = [(e.finish - e.start) - (e.modeled_s or 0.0) for e in rows if e.start is not None]
        wait = [e.start - e.arrival for e in rows if e.start is not None]
        out[kind] = {
            "requests": len(rows),
            "lag_median_ms": 1000 * statistics.median(lag),
            "lag_max_ms": 1000 * max(lag),
            "arrival_to_service_median_ms": 1000 * statistics.median(wait),
            "arrival_to_service_max_ms": 1000 * max(wait),
            "in_flight_max": max(e.in_flight for e in rows),
        }
    return out


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {k: statistics.median(r[k] for r in rows if k in r) for k in keys}


_FAN = (
    ("fan_first_send_s", "cell start -> first sub-call sent (prompts built, batch to the engine)"),
    ("fan_warmup_s", "warm-up sub-call, alone"),
    ("fan_warmup_to_rest_s", "warm-up answered -> the rest sent"),
    ("fan_rest_send_spread_s", "first -> last of the rest sent"),
    ("fan_rest_slowest_s", "first of the rest sent -> last answered"),
    ("fan_rest_latency_median_s", "a sub-call of the rest, median latency"),
    ("fan_last_answer_to_cell_end_s", "last answer -> cell end (answers to the worker, its code)"),
)
_FAN_MODEL = {
    "fan_warmup_s": "fan_warmup_model_s",
    "fan_rest_slowest_s": "fan_rest_slowest_model_s",
}

_ORDER = (
    ("request_in_s", "request in: HTTP, admission, context file read"),
    ("slot_wait_s", "worker slot (max_workers)"),
    ("worker_handout_s", "worker: taken from the pool + context sent"),
    ("root_calls_s", "root turns (model calls)"),
    ("other_cells_s", "cells without sub-calls"),
    ("fanout_cells_s", "fan-out cell (its sub-calls)"),
    ("kill_to_finish_s", "worker kill -> query finish"),
    ("engine_gaps_s", "engine gaps (between the pieces)"),
    ("answer_out_s", "answer out: response to the client"),
)


def format_table(
    alone: dict[str, float] | None,
    burst: dict[str, float],
    cpu: dict[str, Any] | None,
    last: dict[str, float] | None = None,
) -> str:
    """The table `serve_load.py` prints: per-query medians, alone and in the burst, and the
    pieces of the burst's last query to finish (the one that sets the aggregate wall)."""

    def fmt(v: float | None) -> str:
        return "" if v is None else f"{v:.3f}"

    lines = [
        "where a query's time went (medians; model = the simulator's latency model; last = the burst's",
        "last query to finish)",
        "| piece | alone s | burst s | burst - alone s | last s |",
        "|---|---:|---:|---:|---:|",
    ]

    def row(label: str, key: str, extra: str = "") -> None:
        a, b = (alone or {}).get(key), burst.get(key)
        if b is None:
            return
        diff = "" if a is None else f"{b - a:+.3f}"
        lines.append(f"| {label} | {fmt(a)} | {b:.3f}{extra} | {diff} | {fmt((last or {}).get(key))} |")

    for key, label in _ORDER:
        extra = ""
        if key == "root_calls_s":
            extra = f" (model {burst.get('root_calls_model_s', 0.0):.3f})"
        if key == "fanout_cells_s":
            extra = f" (bound {burst.get('fanout_bound_s', 0.0):.3f})"
        row(label, key, extra)
        if key == "fanout_cells_s":
            for fkey, flabel in _FAN:
                model = _FAN_MODEL.get(fkey)
                row(f"&nbsp;&nbsp;{flabel}", fkey, f" (model {burst.get(model, 0.0):.3f})" if model else "")
    row("**query wall at the client**", "client_wall_s")
    if cpu is not None:
        wall, avail, busy = cpu["wall_s"], cpu["available_cpu_s"], cpu["machine_busy_cpu_s"]
        lines += [
            "",
            f"CPU over the burst: wall {wall:.2f} s x {os.cpu_count()} cores = {avail:.2f} CPU s available; "
            f"the machine was busy {busy:.2f} s ({100 * busy / avail:.0f}%)",
            "| process | CPU s | share of available |",
            "|---|---:|---:|",
        ]
        for group, used in cpu["cpu_s"].items():
            lines.append(f"| {group} | {used:.2f} | {100 * used / avail:.0f}% |")
        for part, used in (cpu.get("workers_by_birth_cpu_s") or {}).items():
            n = cpu["workers_by_birth_processes"][part]
            label = part.removeprefix("workers_").replace("_", " ")
            lines.append(
                f"| &nbsp;&nbsp;workers {label} ({n} processes) | {used:.2f} | {100 * used / avail:.0f}% |"
            )
        names = ("server", "simulator", "workers", "locust", "other")
        lines += [
            "",
            "cores in use, every ~0.5 s of the burst (2 = the whole machine)",
            "| t s | " + " | ".join(names) + " | machine |",
            "|---:|" + "---:|" * (len(names) + 1),
        ]
        for row in cpu.get("timeline_cores", []):
            cells = " | ".join(f"{row.get(n, 0.0):.2f}" for n in names)
            lines.append(f"| {row['t']:.1f} | {cells} | {row['machine']:.2f} |")
    return "\n".join(lines)
