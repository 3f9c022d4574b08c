"""Client CPU per request for the wire options, at hundreds of requests in flight.

    .venv/bin/python benchmarks/transport.py [--in-flight 250] [--rounds 4] [--repeat 3] [--only NAME] [--out PATH]

The simulator runs in a child process with a fixed one-word answer and no latency, so what
differs between rows is the client's own work: encoding the request, the HTTP client,
parsing the response. CPU is `getrusage(RUSAGE_SELF)` of this process over the measured
rounds (one warm-up round first), divided by requests; every variant is run `--repeat`
times, interleaved (A B C A B C ...), and the median is reported, since the machine is shared.
Each variant runs on the asyncio loop and on uvloop. Writes benchmarks/results/transport.json.

Variants: the product's `OpenAITransport` on plain HTTP (the lean client, `_wire`) and with
`wire="aiohttp"` (what `https://` uses), `OpenAISDKTransport` (openai SDK on httpx-aiohttp),
and for comparison, defined here only: aiohttp with the
standard `json`, httpx on its own httpcore transport (the wire before, 64 pools), and httpx
on `httpx-aiohttp`'s transport.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
from _provenance import provenance
from httpx_aiohttp import AiohttpTransport

from rlm_async import Message, ModelRequest
from rlm_async import transport as wire
from rlm_async.sim import Policies, PolicySpec, SimConfig, SimProcess
from rlm_async.transport import OpenAISDKTransport, OpenAITransport, Transport

RESULTS = Path(__file__).parent / "results" / "transport.json"
CHUNK = "record: a line of a long document about invoices and help-desk questions\n" * 540  # ~40K chars


def _request(i: int) -> ModelRequest:
    return ModelRequest(
        model="sim-mini",
        messages=(Message("system", "You are a careful reader."), Message("user", f"Question {i}\n{CHUNK}")),
        max_tokens=16,
    )


class HttpxTransport(Transport):
    """The wire before this benchmark's change: httpx (own transport or another) + `json`,
    the pool sharded over `shards` clients, the least busy first."""

    def __init__(self, base_url: str, *, shards: int, transport: Callable[[], Any] | None = None) -> None:
        self.endpoint = base_url
        self._url = base_url + "/chat/completions"
        per = max(1, 1000 // shards)
        limits = httpx.Limits(max_connections=per, max_keepalive_connections=per, keepalive_expiry=60.0)
        self._clients = [
            httpx.AsyncClient(limits=limits, timeout=600.0, transport=transport() if transport else None)
            for _ in range(shards)
        ]
        self._busy = [0] * shards

    async def complete(self, request: ModelRequest) -> Any:
        content = json.dumps(wire._body(request), ensure_ascii=False).encode()
        i = self._busy.index(min(self._busy))
        self._busy[i] += 1
        try:
            r = await self._clients[i].post(
                self._url, content=content, headers={"content-type": "application/json"}
            )
        finally:
            self._busy[i] -= 1
        return wire._parse_completion(json.loads(r.content), r.headers, request.model, self.endpoint)

    async def aclose(self) -> None:
        for c in self._clients:
            await c.aclose()


class StdlibJSONTransport(OpenAITransport):
    """The product's transport with the standard `json` instead of orjson (both ways),
    patched in for this transport's lifetime (variants run one at a time)."""

    def __init__(self, base_url: str, **kw: Any) -> None:
        super().__init__(base_url, **kw)
        self._saved = wire.encode_body, wire._json_or_none
        wire.encode_body = lambda r: json.dumps(wire._body(r), ensure_ascii=False).encode()  # type: ignore[assignment]
        wire._json_or_none = lambda b: json.loads(b)

    async def aclose(self) -> None:
        wire.encode_body, wire._json_or_none = self._saved
        await super().aclose()


def variants(base: str) -> list[tuple[str, Callable[[], Transport]]]:
    return [
        (
            "OpenAITransport, plain HTTP: lean client + orjson (now)",
            lambda: OpenAITransport(base, api_key_env=None),
        ),
        (
            "OpenAITransport, wire=aiohttp: aiohttp + orjson (https:// now)",
            lambda: OpenAITransport(base, api_key_env=None, wire="aiohttp"),
        ),
        ("aiohttp + json", lambda: StdlibJSONTransport(base, api_key_env=None, wire="aiohttp")),
        ("httpx own transport + json, 64 pools (before)", lambda: HttpxTransport(base, shards=64)),
        ("httpx own transport + json, 1 pool", lambda: HttpxTransport(base, shards=1)),
        (
            "httpx on httpx-aiohttp + json, 1 pool",
            lambda: HttpxTransport(
                base, shards=1, transport=lambda: AiohttpTransport(limits=httpx.Limits(max_connections=1000))
            ),
        ),
        (
            "OpenAISDKTransport: openai SDK on httpx-aiohttp",
            lambda: OpenAISDKTransport(base, api_key_env=None),
        ),
    ]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _measure(transport: Transport, in_flight: int, rounds: int) -> tuple[float, float]:
    async def wave() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(in_flight):
                tg.start_soon(transport.complete, _request(i))

    await wave()  # warm-up: connections opened, imports done
    cpu0, wall0 = _cpu(), time.perf_counter()
    for _ in range(rounds):
        await wave()
    cpu, wall = _cpu() - cpu0, time.perf_counter() - wall0
    await transport.aclose()
    return cpu / (in_flight * rounds), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-flight", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="", help="run only the variants whose name contains this")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    print(
        f"{args.in_flight} requests in flight x {args.rounds} rounds x {args.repeat} repeats, "
        f"~{len(_request(0).messages[1].content) // 1000}K-char prompts, simulator in a child process"
    )
    config = SimConfig(policies=Policies(sub=PolicySpec(name="fixed", options={"text": "ok"})))
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with SimProcess(config) as sim:
        assert sim.base_url is not None
        plan = [(name, make) for name, make in variants(sim.base_url) if args.only in name]
        for _ in range(args.repeat):
            for loop in ("asyncio", "uvloop"):
                for name, make in plan:
                    options = {"use_uvloop": loop == "uvloop"}
                    cpu, wall = anyio.run(
                        _measure_made, make, args.in_flight, args.rounds, backend_options=options
                    )
                    samples.setdefault((name, loop), []).append((cpu, wall))
    rows: list[dict[str, object]] = []
    for (name, loop), runs in samples.items():
        cpu = statistics.median(c for c, _ in runs)
        wall = statistics.median(w for _, w in runs)
        rows.append(
            {
                "transport": name,
                "loop": loop,
                "cpu_ms_per_request": round(cpu * 1000, 3),
                "cpu_ms_per_request_runs": [round(c * 1000, 3) for c, _ in runs],
                "wall_s": round(wall, 3),
            }
        )
        print(f"{name:<50} {loop:8} {cpu * 1000:8.3f} ms CPU/request   {wall:6.2f} s wall")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "transport",
                "in_flight": args.in_flight,
                "rounds": args.rounds,
                "repeat": args.repeat,
                **provenance("transport.py", sys.argv[1:], load_avg=os.getloadavg()),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


async def _measure_made(make: Callable[[], Transport], in_flight: int, rounds: int) -> tuple[float, float]:
    return await _measure(make(), in_flight, rounds)


if __name__ == "__main__":
    main()
