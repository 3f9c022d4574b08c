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
import resource
from pathlib import Path

import aiohttp
import anyio
from _loop_ab import Samples, median_rows, write_results

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
    samples: Samples = {}
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
    rows = median_rows(
        samples,
        variant="connector",
        figure="cpu_us_per_connection",
        runs="runs_us",
        scale=1e6,
        digits=1,
        heading="µs CPU per connection (median)",
        formats=(".1f", ".0f"),
    )
    write_results(RESULTS, "connect", {"connections": args.connections, "repeat": args.repeat}, rows)


if __name__ == "__main__":
    main()
