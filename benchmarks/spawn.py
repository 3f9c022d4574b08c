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
import os
import resource
import subprocess
from pathlib import Path

import anyio
from _loop_ab import Samples, median_rows, write_results

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
    samples: Samples = {}
    for _ in range(args.repeat):
        for loop in ("asyncio", "uvloop"):
            for name in STARTERS:
                options = {"use_uvloop": loop == "uvloop"}
                cpu = anyio.run(_measure, args.starts, name, backend_options=options)
                samples.setdefault((name, loop), []).append(cpu)
    del ballast
    rows = median_rows(
        samples,
        variant="start",
        figure="cpu_ms_per_start",
        runs="runs_ms",
        scale=1e3,
        digits=3,
        heading="ms CPU per start (median)",
        formats=(".2f", ".2f"),
    )
    params = {"ballast_mb": args.ballast, "starts": args.starts, "repeat": args.repeat}
    write_results(RESULTS, "spawn", params, rows)


if __name__ == "__main__":
    main()
