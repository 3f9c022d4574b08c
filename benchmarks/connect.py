"""Client CPU per new connection through the transport's pool: aiohttp's own connector
against the transport's direct one, on asyncio and on uvloop.

    .venv/bin/python benchmarks/connect.py [--connections 1000] [--repeat 5]

A wide fan-out opens one connection per concurrent sub-call (1,000 at 1,000 chunks), so
this cost is part of every sub-call's engine CPU. Each run makes a fresh `OpenAITransport`
and opens `--connections` connections to the simulator (a child process: uvicorn on
uvloop) with `preconnect`, the path a request's connection takes too; CPU is
`getrusage(RUSAGE_SELF)` of this process over the opening, divided by the connections
opened. Variants run interleaved, `--repeat` times; the median is reported.
Writes benchmarks/results/connect.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
from pathlib import Path

import aiohttp
import anyio
from _provenance import provenance

from rlm_async import transport as wire
from rlm_async.sim import SimConfig, SimProcess
from rlm_async.transport import OpenAITransport

RESULTS = Path(__file__).parent / "results" / "connect.json"
CONNECTORS = {"aiohttp's TCPConnector": aiohttp.TCPConnector, "direct (the transport's)": wire._CONNECTOR}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _open(base_url: str, n: int) -> tuple[float, int]:
    transport = OpenAITransport(base_url, api_key_env=None, max_connections=n)
    await transport.preconnect(1)  # the session, the pool, imports: not counted
    cpu0 = _cpu()
    opened = await transport.preconnect(n)
    cpu = _cpu() - cpu0
    await transport.aclose()
    return cpu, opened - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    samples: dict[tuple[str, str], list[float]] = {}
    with SimProcess(SimConfig()) as sim:
        assert sim.base_url is not None
        for _ in range(args.repeat):
            for loop in ("asyncio", "uvloop"):
                for name, connector in CONNECTORS.items():
                    wire._CONNECTOR = connector
                    cpu, opened = anyio.run(
                        _open,
                        sim.base_url,
                        args.connections,
                        backend_options={"use_uvloop": loop == "uvloop"},
                    )
                    if opened < args.connections - 1:
                        raise SystemExit(f"{name} on {loop}: opened {opened} of {args.connections - 1}")
                    samples.setdefault((name, loop), []).append(cpu / opened)
    rows = []
    print(f"{'connector':<28} {'loop':<8} {'µs CPU per connection (median)':>31}   runs")
    for (name, loop), runs in samples.items():
        median = statistics.median(runs)
        rows.append(
            {
                "connector": name,
                "loop": loop,
                "cpu_us_per_connection": round(median * 1e6, 1),
                "runs_us": [round(r * 1e6, 1) for r in runs],
            }
        )
        print(f"{name:<28} {loop:<8} {median * 1e6:>31.1f}   {', '.join(f'{r * 1e6:.0f}' for r in runs)}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "connect",
                "connections": args.connections,
                "repeat": args.repeat,
                **provenance("connect.py", sys.argv[1:], load_avg=os.getloadavg()),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
