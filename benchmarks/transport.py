"""Client CPU per request for the wire options, at hundreds of requests in flight.

    python benchmarks/transport.py [--in-flight 200] [--rounds 3]

The simulator runs in a child process (its own core) with a fixed one-word answer and no
latency, so what differs between rows is the client's own work: building the request,
httpx/httpcore, parsing the response. CPU is `time.process_time()` of this process over
the measured rounds (one warm-up round first), divided by requests. Writes
benchmarks/results/transport.json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import anyio
from _provenance import provenance

from rlm_async import Message, ModelRequest
from rlm_async.sim import Policies, PolicySpec, SimConfig, SimProcess
from rlm_async.transport import DEFAULT_SHARDS, OpenAISDKTransport, OpenAITransport, Transport

RESULTS = Path(__file__).parent / "results" / "transport.json"
CHUNK = "record: a line of a long document about invoices and help-desk questions\n" * 270  # ~20K chars


def _request(i: int) -> ModelRequest:
    return ModelRequest(
        model="sim-mini",
        messages=(Message("system", "You are a careful reader."), Message("user", f"Question {i}\n{CHUNK}")),
        max_tokens=16,
    )


async def _measure(transport: Transport, in_flight: int, rounds: int) -> tuple[float, float]:
    async def wave() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(in_flight):
                tg.start_soon(transport.complete, _request(i))

    await wave()  # warm-up: connections opened, imports done
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(rounds):
        await wave()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    await transport.aclose()
    return cpu / (in_flight * rounds), wall


async def main_async(in_flight: int, rounds: int) -> list[dict[str, object]]:
    config = SimConfig(policies=Policies(sub=PolicySpec(name="fixed", options={"text": "ok"})))
    rows: list[dict[str, object]] = []
    with SimProcess(config) as sim:
        assert sim.base_url is not None
        base = sim.base_url
        variants: list[tuple[str, Callable[[], Transport]]] = [
            ("httpx + json, 1 pool", lambda: OpenAITransport(base, api_key_env=None, shards=1)),
            (
                f"httpx + json, {DEFAULT_SHARDS} pools (default)",
                lambda: OpenAITransport(base, api_key_env=None),
            ),
            ("openai SDK, 1 pool", lambda: OpenAISDKTransport(base, api_key_env=None, shards=1)),
            (f"openai SDK, {DEFAULT_SHARDS} pools", lambda: OpenAISDKTransport(base, api_key_env=None)),
        ]
        for name, make in variants:
            cpu, wall = await _measure(make(), in_flight, rounds)
            rows.append(
                {"transport": name, "cpu_ms_per_request": round(cpu * 1000, 3), "wall_s": round(wall, 3)}
            )
            print(f"{name:<34} {cpu * 1000:8.2f} ms CPU/request   {wall:6.2f} s wall")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-flight", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(
        f"{args.in_flight} requests in flight x {args.rounds} rounds, ~20K-char prompts, simulator in a child"
    )
    rows = anyio.run(main_async, args.in_flight, args.rounds)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "transport",
                "in_flight": args.in_flight,
                "rounds": args.rounds,
                **provenance("transport.py"),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
