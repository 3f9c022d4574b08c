"""The simulator's CPU per request in a wide fan-out: what `benchmarks/fanout.py` reports as
`sim s`, measured apart from the engine.

    .venv/bin/python benchmarks/sim_cpu.py [--chunks 1000] [--rounds 3] [--app-requests 400]

The sub-call bodies of the fan-out benchmark's COUNT case (10M tokens cut into `--chunks`
chunks: 45 KB each at 1,000, 13 KB at 5,000), built here as the engine would send them.

* `http`: a `SimProcess` with the fan-out benchmark's latencies; an aiohttp client sends one
  request, then the rest all at once (a warmed fan-out), each on its own connection. The
  figure is the simulator process's CPU (from /proc) over a round / requests: everything
  it does, the HTTP server included. Median of `--rounds` rounds.
* `app`: the same bodies handed straight to `SimApp` in this process, one at a time, no HTTP
  server and no log file: the simulator's own work per request (parsing, tokens, prefix
  cache, the scripted sub model, the log entry). Median over requests of `process_time`.

CPU time, not wall time: on a shared machine it is what stays comparable between runs.
To compare two trees, run this script from each (`PYTHONPATH=<tree>`), alternating.

Measured (docs/benchmarks.md, "The simulator's CPU, halved"; load average 4-6, two runs
each, alternated with main at 41a96cb): at 1,000 chunks http 0.95, 0.90 -> 0.55, 0.56 ms and
app 0.65, 0.66 -> 0.29, 0.33 ms; at 5,000 chunks http 0.57, 0.56 -> 0.28, 0.28 ms and app
0.27, 0.28 -> 0.12, 0.12 ms per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
from fanout import BENCH_LATENCY

from rlm_async._prompts import sub_system_prompt
from rlm_async.demo import sim_config
from rlm_async.sim import LatencyModel, SimProcess
from rlm_async.sim._app import SimApp
from rlm_async.sim.policies import sub_prompt_header
from rlm_async.workloads import make_workload


def bodies(chunks: int) -> list[bytes]:
    """The sub-call request bodies of a COUNT fan-out over 10M tokens in `chunks` chunks."""
    workload = make_workload("oolong", "10M", seed=0)
    text = workload.context
    assert isinstance(text, str)
    header = sub_prompt_header(workload.query)
    step = len(text) // chunks
    out: list[bytes] = []
    pos = 0
    for i in range(chunks):
        end = text.find("\n", pos + step) if i < chunks - 1 else -1
        end = len(text) if end < 0 else end
        prompt = header + f"Chunk {i + 1} of {chunks}.\n<<<CHUNK\n{text[pos:end]}\nCHUNK>>>"
        pos = end + 1
        messages = [{"role": "system", "content": sub_system_prompt()}, {"role": "user", "content": prompt}]
        out.append(orjson.dumps({"model": "sim-model", "messages": messages, "max_tokens": 1000}))
    return out


def _proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _fan_out(url: str, payloads: list[bytes]) -> list[int]:
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(body: bytes) -> int:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                return response.status

        first = await one(payloads[0])
        return [first, *await asyncio.gather(*(one(b) for b in payloads[1:]))]


def over_http(payloads: list[bytes], rounds: int) -> list[float]:
    """Simulator CPU ms per request, one figure per round."""
    per_request: list[float] = []
    with SimProcess(sim_config(len(payloads), latency=BENCH_LATENCY)) as sim:
        assert sim.base_url is not None and sim.pid is not None
        for _ in range(rounds):
            cpu0 = _proc_cpu_s(sim.pid)
            statuses = asyncio.run(_fan_out(sim.base_url + "/chat/completions", payloads))
            cpu1 = _proc_cpu_s(sim.pid)
            assert statuses == [200] * len(payloads), sorted(set(statuses))
            per_request.append(1e3 * (cpu1 - cpu0) / len(payloads))
    return per_request


async def in_app(payloads: list[bytes]) -> list[float]:
    """`SimApp` CPU ms per request, each request alone (the first one, which builds caches,
    left out)."""
    app = SimApp(sim_config(len(payloads), latency=LatencyModel()))
    scope = {"type": "http", "path": "/v1/chat/completions", "method": "POST", "headers": []}
    times: list[float] = []
    for body in payloads:
        exchange = _Exchange(body)
        t = time.process_time()
        await app(scope, exchange.receive, exchange.send)
        times.append(1e3 * (time.process_time() - t))
        assert exchange.sent[0]["status"] == 200, exchange.sent
    return times[1:]


class _Exchange:
    """One request's ASGI receive and send: the body, then nothing (the client stays)."""

    def __init__(self, body: bytes) -> None:
        self.messages: list[MutableMapping[str, Any]] = [{"type": "http.request", "body": body}]
        self.sent: list[MutableMapping[str, Any]] = []

    async def receive(self) -> MutableMapping[str, Any]:
        if self.messages:
            return self.messages.pop()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(self, message: MutableMapping[str, Any]) -> None:
        self.sent.append(message)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--app-requests", type=int, default=400, help="requests for the in-process figure")
    p.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = p.parse_args(argv)
    payloads = bodies(args.chunks)
    load0 = os.getloadavg()[0]
    http = over_http(payloads, args.rounds)
    app = anyio.run(in_app, payloads[: args.app_requests])
    result = {
        "chunks": args.chunks,
        "body_kb": round(statistics.fmean(len(b) for b in payloads) / 1024, 1),
        "http_ms_per_request": round(statistics.median(http), 3),
        "http_rounds": [round(x, 3) for x in http],
        "app_ms_per_request": round(statistics.median(app), 3),
        "load_avg": [round(load0, 1), round(os.getloadavg()[0], 1)],
        "tree": str(Path(sys.modules["rlm_async"].__file__ or "").parent.parent),
    }
    sys.stdout.write(json.dumps(result) + "\n")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
