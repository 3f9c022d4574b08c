"""Rate-limit benchmark: a large fan-out through the whole engine, over HTTP, against the
simulator with RPM/TPM limits on. How much of the limits does it use, how many 429s?

    .venv/bin/python benchmarks/ratelimit.py [--out benchmarks/results/ratelimit.json]
                                              [--rpm 1200] [--tpm 2400000] [--no-stub]

The server is `rlm_async.sim` in a child process (`SimProcess`: its own core, real HTTP on
loopback) with OpenAI's limiter semantics: continuously refilling buckets of `rpm` requests
and `tpm` tokens (prompt + `max_tokens`, counted at arrival), 429 with `retry-after`, and
`x-ratelimit-*` headers on every answer. The client is the engine itself: `RLM.acompletion`
over an OOLONG-style counting query whose scripted root model writes one `llm_batch` of
N prompts (N chosen so the run outlasts the limit's one-minute burst by 20-25 s), with
the demo's stand-in models, latencies and output caps (sub-calls: `max_tokens` 256, about
0.3 s each). Prefix-cache warm-up is off, so the whole fan-out is ready at once.

Two scenarios, each binding one limit (the other is set far out of reach):

* `rpm`  rpm = --rpm, tpm = 10M       N = rpm + 25 s of refill
* `tpm`  rpm = 100k,  tpm = --tpm      N = what tpm + 25 s of refill admits

and three clients per scenario:

* `configured`    the governor told the server's RPM/TPM (`EndpointLimits`), concurrency 128
* `headers-only`  told nothing but concurrency 128: it learns the limits from the
                  `x-ratelimit-*` headers and pauses on 429s
* `configured-c1000`  as `configured` with concurrency 1000 (the `ModelConfig` default):
                  the first burst goes out at once

Reported per run, all from the server's request log:

* `429 share`: requests answered 429, over all requests the server saw (target <= 1%).
* `RPM share` / `TPM share`: the sustained rate, as a share of the configured one, for the
  limit that binds. A bucket that is full when the fan-out's first sub-call arrives admits at
  most `C + r*T` in the `T` seconds up to the last admitted sub-call (capacity C, refill r),
  so the share is `(admitted - C) / (r*T)`: 100% means the client kept the server's bucket
  empty from the first burst to the end (target >= 95%). `-` where the limit never bound.
* `wall`: the query's wall time; `bound`: the least the binding limit allows for the sub-calls,
  `(demand - C) / r`; `correct`: whether the answer matched the workload's ground truth.

A second, smaller table (`--no-stub` skips it) is the earlier virtual-time variant, kept
because it is the only place a naive client is measured: the same limiter bookkeeping
(`rlm_async.sim._ratelimit`) behind an in-process `ScriptedTransport`, no HTTP, time on a
`ManualClock`, so runs that would take minutes finish in seconds. It compares the governor
(told the limits, or learning them from headers) with `pause-only` (no limits, only the
shared 429 pause) and `retries-only` (every call at once, each retrying on its own after
`retry-after`). It measures the governor's pacing, not the engine, HTTP, or a real server.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from rlm_async import RLM
from rlm_async._governor import EndpointLimits, Governor, GovernorConfig, ManualClock, ModelPrice, RetryConfig
from rlm_async._types import Completion, Message, ModelRequest, Usage
from rlm_async.demo import DEMO_LATENCY, demo_config
from rlm_async.exceptions import RateLimited, RetryableError
from rlm_async.sim import Policies, PolicySpec, RateLimits, RequestLog, SimConfig, SimProcess
from rlm_async.sim._ratelimit import RateLimiter
from rlm_async.sim._tokens import prompt_tokens
from rlm_async.testing import ScriptedTransport
from rlm_async.transport import parse_rate_limit_headers, retry_after_seconds
from rlm_async.workloads import oolong_counting

SUSTAIN_S = 25.0
"""How long past the first burst each run should last, if the client kept up with the limit."""
SUB_MAX_TOKENS = 256  # demo_config's sub model
TOKENS_PER_SUB = 1_810  # measured: prompt tokens of one sub-call (about 1,550) + max_tokens
OFF = {"rpm": 100_000, "tpm": 10_000_000}  # a limit that never binds


# ================================================================ over HTTP, through the engine


@dataclass
class Row:
    scenario: str
    client: str
    concurrency: int
    rpm: int
    tpm: int
    chunks: int
    requests: int
    rate_limited: int
    rpm_share: float | None
    tpm_share: float | None
    wall_s: float
    bound_s: float
    correct: bool
    status: str

    @property
    def share_429(self) -> float:
        return self.rate_limited / self.requests if self.requests else 0.0

    def line(self) -> str:
        def pct(x: float | None) -> str:
            return "      -" if x is None else f"{x:7.1%}"

        return (
            f"{self.scenario:4} {self.client:17} {self.requests:6d} {self.rate_limited:5d} "
            f"{self.share_429:7.2%} {pct(self.rpm_share)} {pct(self.tpm_share)} "
            f"{self.wall_s:7.1f} {self.bound_s:7.1f}  {'yes' if self.correct else 'NO'}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "share_429": self.share_429}


HEADER = (
    f"{'lim':4} {'client':17} {'reqs':>6} {'429s':>5} {'429 %':>7} {'RPM %':>7} {'TPM %':>7} "
    f"{'wall s':>7} {'bound s':>7}  correct"
)


def sustained_share(demand: float, capacity: int, period_s: float) -> float | None:
    """`(admitted - C) / (r*T)`, or None when the run never needed more than the burst."""
    if demand <= capacity or period_s <= 0:
        return None
    return (demand - capacity) / (capacity / 60.0 * period_s)


def measure(log: RequestLog, rpm: int, tpm: int) -> tuple[int, int, float | None, float | None, float]:
    """(requests, 429s, RPM share, TPM share, sub-call demand bound in s) from a request log."""
    subs = [e for e in log.by_arrival() if e.kind == "sub"]
    admitted = [e for e in subs if e.status == 200]
    start = subs[0].arrival
    period = max(e.arrival for e in admitted) - start
    tokens = sum(e.prompt_tokens + (e.max_tokens or 0) for e in admitted)
    bound = max(
        60.0 * (len(admitted) - rpm) / rpm,
        60.0 * (tokens - tpm) / tpm,
        0.0,
    )
    rejected = sum(1 for e in log if e.status == 429)
    return (
        len(log),
        rejected,
        sustained_share(len(admitted), rpm, period),
        sustained_share(tokens, tpm, period),
        bound,
    )


async def run_engine(scenario: str, client: str, rpm: int, tpm: int, chunks: int, seed: int) -> Row:
    workload = oolong_counting("128k", seed=seed)
    policies = Policies(root=PolicySpec(name="rlm", options={"chunks": chunks, "max_chunks": chunks}))
    sim_config = SimConfig(
        seed=seed, latency=DEMO_LATENCY, rate_limits=RateLimits(rpm=rpm, tpm=tpm), policies=policies
    )
    concurrency = 1000 if client.endswith("c1000") else 128
    if client == "headers-only":
        limits = EndpointLimits(max_concurrency=concurrency)
    else:
        limits = EndpointLimits(max_concurrency=concurrency, requests_per_minute=rpm, tokens_per_minute=tpm)
    async with SimProcess(sim_config) as sim:
        assert sim.base_url is not None
        config = demo_config(sim.base_url, cache=False)
        assert config.sub is not None
        config = dataclasses.replace(
            config,
            root=dataclasses.replace(config.root, limits=limits),
            sub=dataclasses.replace(config.sub, limits=limits),
        )
        async with RLM(config=config, governor=Governor(config.governor)) as rlm:
            result = await rlm.acompletion(workload.context, workload.query)
    requests, rejected, rpm_share, tpm_share, bound = measure(sim.read_log(), rpm, tpm)
    return Row(
        scenario=scenario,
        client=client,
        concurrency=concurrency,
        rpm=rpm,
        tpm=tpm,
        chunks=chunks,
        requests=requests,
        rate_limited=rejected,
        rpm_share=rpm_share,
        tpm_share=tpm_share,
        wall_s=result.execution_time,
        bound_s=bound,
        correct=workload.score(result.response),
        status=result.status,
    )


# ================================================================ stub, virtual time (no HTTP)

STUB_MODEL = "sim-sub"


@dataclass
class StubOutcome:
    client: str
    calls: int
    failed: int
    makespan_s: float
    lower_bound_s: float
    rate_limited: int
    attempts: int
    wall_s: float

    def line(self) -> str:
        # Calls that gave up make a run look fast: no efficiency for a run with failures.
        eff = (
            f"{self.lower_bound_s / self.makespan_s:7.0%}"
            if self.makespan_s and not self.failed
            else "      -"
        )
        share = self.rate_limited / self.attempts if self.attempts else 0.0
        return (
            f"{self.client:13} {self.makespan_s:9.1f} {self.lower_bound_s:9.1f} {eff} "
            f"{self.rate_limited:7d} {share:7.1%} {self.attempts:8d} {self.failed:6d} "
            f"{1e3 * self.wall_s / self.calls:9.2f}"
        )


def stub_requests(n: int, seed: int) -> list[ModelRequest]:
    rng = random.Random(seed)
    return [
        ModelRequest(
            model=STUB_MODEL,
            messages=(Message("system", "Answer briefly."), Message("user", "x" * rng.randint(200, 4000))),
            max_tokens=SUB_MAX_TOKENS,
        )
        for _ in range(n)
    ]


def stub_server(clock: ManualClock, limits: RateLimits, seed: int) -> tuple[ScriptedTransport, list[int]]:
    limiter = RateLimiter(limits, clock())
    rng = random.Random(seed)
    refused = [0]

    async def handler(request: ModelRequest) -> Completion:
        prompt = prompt_tokens(request.messages)
        admission = limiter.admit(prompt + (request.max_tokens or 0), clock(), request.model)
        if not admission.allowed:
            refused[0] += 1
            raise RateLimited(
                admission.message or "429",
                status_code=429,
                retry_after=retry_after_seconds(admission.headers),
            )
        out = rng.randint(20, SUB_MAX_TOKENS)
        await clock.sleep(0.3 + 0.01 * out)  # time to first token + decoding, virtual
        return Completion(
            text="",
            usage=Usage(prompt, out),
            model=request.model,
            rate_limit=parse_rate_limit_headers(admission.headers),
        )

    return ScriptedTransport(handler, endpoint="stub://openai-like"), refused


async def run_stub(
    name: str, limits: EndpointLimits, requests: list[ModelRequest], server: RateLimits, seed: int
) -> StubOutcome:
    clock = ManualClock()
    governor = Governor(
        GovernorConfig(
            default_limits=limits,
            chars_per_token=4.0,
            retry=RetryConfig(max_attempts=100, retry_after_cap_s=60.0),
        ),
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(seed),
    )
    governor.prices.set_price(STUB_MODEL, ModelPrice.free())
    transport, refused = stub_server(clock, server, seed)
    failed = 0

    async def one(request: ModelRequest) -> None:
        nonlocal failed
        try:
            await governor.call(request, transport)
        except RetryableError:
            failed += 1

    started = time.perf_counter()
    async with clock.autojump(), anyio.create_task_group() as tg:
        for request in requests:
            tg.start_soon(one, request)
    wall = time.perf_counter() - started
    counted = sum(prompt_tokens(r.messages) + SUB_MAX_TOKENS for r in requests)
    bounds = [0.0]
    if server.rpm:
        bounds.append(60.0 * max(0, len(requests) - server.rpm) / server.rpm)
    if server.tpm:
        bounds.append(60.0 * max(0, counted - server.tpm) / server.tpm)
    return StubOutcome(
        client=name,
        calls=len(requests),
        failed=failed,
        makespan_s=clock(),
        lower_bound_s=max(bounds),
        rate_limited=refused[0],
        attempts=len(transport.requests),
        wall_s=wall,
    )


async def stub_table(calls: int, rpm: int, tpm: int, seed: int) -> list[StubOutcome]:
    server = RateLimits(rpm=rpm, tpm=tpm)
    requests = stub_requests(calls, seed)
    clients = {
        "configured": EndpointLimits(max_concurrency=256, requests_per_minute=rpm, tokens_per_minute=tpm),
        "headers-only": EndpointLimits(max_concurrency=64),
        "pause-only": EndpointLimits(max_concurrency=None, adaptive=False, learn_from_headers=False),
        "retries-only": EndpointLimits(
            max_concurrency=None, adaptive=False, learn_from_headers=False, shared_pause=False
        ),
    }
    print(f"\nStub (virtual time, no HTTP, no engine): {calls} calls at once; limits {rpm} RPM, {tpm:,} TPM")
    print(
        f"{'client':13} {'makespan':>9} {'bound':>9} {'eff':>7} {'429s':>7} {'429 %':>7} {'attempts':>8} "
        f"{'failed':>6} {'ms/call':>9}"
    )
    outcomes = []
    for name, limits in clients.items():
        outcome = await run_stub(name, limits, requests, server, seed)
        outcomes.append(outcome)
        print(outcome.line(), flush=True)
    return outcomes


# ================================================================ main


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpm", type=int, default=1200, help="the rpm scenario's limit")
    parser.add_argument("--tpm", type=int, default=2_400_000, help="the tpm scenario's limit")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--clients", default="configured,headers-only,configured-c1000")
    parser.add_argument("--no-stub", action="store_true", help="skip the virtual-time stub table")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    scenarios = {
        "rpm": (args.rpm, OFF["tpm"], int(args.rpm * (1 + SUSTAIN_S / 60))),
        "tpm": (OFF["rpm"], args.tpm, int(args.tpm * (1 + SUSTAIN_S / 60) / TOKENS_PER_SUB)),
    }
    started = time.perf_counter()
    print("Engine over HTTP against the simulator (child process), one llm_batch per run")
    for name, (rpm, tpm, chunks) in scenarios.items():
        print(f"  {name}: {chunks} sub-calls, limits {rpm:,} RPM / {tpm:,} TPM")
    print(HEADER, flush=True)
    rows = []
    for name, (rpm, tpm, chunks) in scenarios.items():
        for client in clients:
            row = await run_engine(name, client, rpm, tpm, chunks, args.seed)
            rows.append(row)
            print(row.line(), flush=True)
    stub = [] if args.no_stub else await stub_table(2000, 600, 400_000, args.seed)
    total = time.perf_counter() - started
    print(f"\n{total:.0f} s in all")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "command": "python benchmarks/ratelimit.py " + " ".join(argv),
            "seed": args.seed,
            "sustain_s": SUSTAIN_S,
            "engine_over_http": [r.to_dict() for r in rows],
            "stub_virtual_time": {
                "calls": 2000,
                "rpm": 600,
                "tpm": 400_000,
                "results": [o.__dict__ for o in stub],
            },
            "total_s": round(total, 1),
            "machine": {"cpus": os.cpu_count(), "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
        }
        args.out.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main, sys.argv[1:]))
