"""Where a hedged fan-out's time goes: one hedged run of `benchmarks/hedging.py`'s workload.

    .venv/bin/python benchmarks/hedging_timeline.py [--n 1000] [--sigma 0.6]

Prints, on one clock (the engine's and the simulator's `time.monotonic`, one machine):
how long the originals took to reach the server after the first sub-call started, how
long a hedge took from being ordered (`call.hedge`) to reaching the server (the i-th
order paired with the i-th copy to arrive), when the first and last hedges were ordered,
the server's own queueing and lag, and the fan-out's wall. A diagnostic, not a target: it
says whether hedges wait in the engine, in the server, or not at all.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hedging as bench

from rlm_async import _events
from rlm_async._rlm import RLM
from rlm_async.sim._log import LogEntry


async def _run(base_url: str) -> tuple[list[_events.Event], Any]:
    seen: list[_events.Event] = []
    async with RLM(config=bench._rlm_config(base_url, True), event_sinks=[seen.append]) as rlm:
        result = await rlm.acompletion("ctx", "q")
    return seen, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--sigma", type=float, default=0.6)
    args = parser.parse_args(argv)
    n = args.n
    workdir = Path("/tmp/rlm-hedging-timeline")
    workdir.mkdir(exist_ok=True)
    log, port = workdir / "log.jsonl", workdir / "port"
    log.unlink(missing_ok=True)
    port.unlink(missing_ok=True)
    sim = bench._sim_config(n, args.sigma, 1000 * n, str(log))
    proc = multiprocessing.get_context("spawn").Process(
        target=bench._sim_main, args=(sim, str(port)), daemon=True
    )
    proc.start()
    try:
        while not (port.exists() and port.read_text()):
            time.sleep(0.05)
        seen, result = anyio.run(_run, f"http://127.0.0.1:{port.read_text()}/v1")
        time.sleep(0.5)  # the server logs a cancelled copy when it notices the disconnect
        entries = [LogEntry.from_dict(json.loads(line)) for line in log.read_text().splitlines()]
    finally:
        proc.terminate()
        proc.join(5)
    subs = sorted((e for e in entries if e.kind == "sub"), key=lambda e: e.seq)
    originals: dict[str, LogEntry] = {}
    copies: list[LogEntry] = []
    for e in subs:
        if e.body_sha256 in originals:
            copies.append(e)
        else:
            originals[e.body_sha256] = e
    t0 = min(e.time for e in seen if isinstance(e, _events.CallStart) and e.call_kind == "sub")
    ordered = sorted(e.time for e in seen if isinstance(e, _events.CallHedge))
    arrivals = sorted(e.arrival for e in originals.values())
    print(f"n={n} sigma={args.sigma}: {len(ordered)} hedges ordered, {len(copies)} copies reached the server")
    print(
        f"originals reached the server from {arrivals[0] - t0:.2f} s to {arrivals[-1] - t0:.2f} s after the first call.start"
    )
    if ordered and copies:
        waits = [a - h for a, h in zip(sorted(e.arrival for e in copies), ordered, strict=False)]
        print(f"hedges ordered from {ordered[0] - t0:.2f} s to {ordered[-1] - t0:.2f} s")
        print(
            f"order -> arrival: median {1e3 * statistics.median(waits):.0f} ms, max {1e3 * max(waits):.0f} ms"
        )
    queued = [e.start - e.arrival for e in subs if e.start is not None]
    lag = [
        (e.finish - e.start) - (e.modeled_s or 0.0) for e in subs if e.outcome == "ok" and e.start is not None
    ]
    print(
        f"server queue: median {1e3 * statistics.median(queued):.1f} ms; server lag: median {1e3 * statistics.median(lag):.0f} ms"
    )
    ends = [e.time for e in seen if isinstance(e, _events.CallFinish) and e.depth == 1]
    print(f"fan-out wall {max(ends) - t0:.2f} s; answer {result.response}")


if __name__ == "__main__":
    main()
