"""The engine's CPU per process start: the sandbox's `start_child` (subprocess.Popen, a
pidfd) against the event loop's `anyio.open_process`, on asyncio and on uvloop, from a
parent holding `--ballast` MB (an engine with a large context, or serving many queries).

    .venv/bin/python benchmarks/spawn.py [--ballast 250] [--starts 50] [--repeat 3]

Each start runs `/bin/true` in a session of its own (as a worker is started) and waits for
its exit; CPU is `getrusage(RUSAGE_SELF)` of this process over the starts, its threads
included (asyncio's child watcher), divided by the starts. Variants run interleaved,
`--repeat` times; the median is reported. Writes benchmarks/results/spawn.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import anyio
from _provenance import provenance

from rlm_async.sandbox._child import start_child

RESULTS = Path(__file__).parent / "results" / "spawn.json"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _loop_api() -> None:
    proc = await anyio.open_process(
        ["/bin/true"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    await proc.wait()


async def _start_child() -> None:
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        child = await start_child(["/bin/true"], stdout=null, stderr=null, env={}, cwd="/", pass_fds=())
    finally:
        os.close(null)
    await child.wait()


STARTERS = {"anyio.open_process (the loop's)": _loop_api, "start_child (Popen + pidfd)": _start_child}


async def _measure(starts: int, name: str) -> float:
    start = STARTERS[name]
    await start()  # imports, first-use set-up: not counted
    cpu0 = _cpu()
    for _ in range(starts):
        await start()
    return (_cpu() - cpu0) / starts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ballast", type=int, default=250, help="MB the parent holds (touched)")
    parser.add_argument("--starts", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    ballast = [bytearray(b"\1" * (1 << 20)) for _ in range(args.ballast)]
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeat):
        for loop in ("asyncio", "uvloop"):
            for name in STARTERS:
                options = {"use_uvloop": loop == "uvloop"}
                cpu = anyio.run(_measure, args.starts, name, backend_options=options)
                samples.setdefault((name, loop), []).append(cpu)
    del ballast
    rows = []
    print(f"{'start':<32} {'loop':<8} {'ms CPU per start (median)':>26}   runs")
    for (name, loop), runs in samples.items():
        median = statistics.median(runs)
        rows.append(
            {
                "start": name,
                "loop": loop,
                "cpu_ms_per_start": round(median * 1e3, 3),
                "runs_ms": [round(r * 1e3, 3) for r in runs],
            }
        )
        print(f"{name:<32} {loop:<8} {median * 1e3:>26.2f}   {', '.join(f'{r * 1e3:.2f}' for r in runs)}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "spawn",
                "ballast_mb": args.ballast,
                "starts": args.starts,
                "repeat": args.repeat,
                **provenance("spawn.py", sys.argv[1:], load_avg=os.getloadavg()),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
