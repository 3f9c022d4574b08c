"""Budget benchmark: how much of a token cap a fan-out can use, by token estimator.

    .venv/bin/python benchmarks/budget.py [--out benchmarks/results/budget.json]
                                          [--prompts 500] [--chars 50000] [--cap 1000000]

A budget reserves each call's upper bound before sending and refunds the rest when the
server reports usage. A fan-out's prompts all reserve at once, and those that do not fit
are refused, so how tight the bound is decides how much of a cap a user gets. The client is
the engine itself (`RLM.acompletion`, real HTTP on loopback, a sandboxed worker): a scripted
root model writes one `llm_batch` of `--prompts` prompts of `--chars` characters each under
`BudgetLimits(max_total_tokens=--cap)`, against `rlm_async.sim` in this process (its
tokenizer: four characters a token, see `rlm_async/sim/_tokens.py`).

Three estimators:

* `utf8-bytes`   the default: UTF-8 bytes + template allowances, a bound for any BPE
* `chars/4`      `GovernorConfig(chars_per_token=4)`: the simulator's documented ratio
* `tokenizer`    `TokenizerEstimator(count_tokens=...)` with the simulator's own count,
                 where a real deployment would plug in its model's tokenizer

Reported per estimator, from the server's request log and the engine's budget events:
sub-calls the server served, tokens it counted (prompt + completion) and their share of the
cap, the status, and the reservation-to-actual ratio (mean tokens reserved per sub-call over
mean tokens the server reported for it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from _provenance import provenance

from rlm_async import RLM
from rlm_async._config import ModelConfig, RLMConfig
from rlm_async._events import BudgetReserve, BudgetSettle, Event
from rlm_async._governor import (
    BudgetLimits,
    Governor,
    GovernorConfig,
    ModelPrice,
    TokenEstimator,
    TokenizerEstimator,
)
from rlm_async.sandbox import SandboxConfig
from rlm_async.sim import Policies, PolicySpec, SimConfig, SimServer
from rlm_async.sim._tokens import count_tokens

MAX_TOKENS = 256


def _estimators() -> list[tuple[str, GovernorConfig, TokenEstimator | None]]:
    return [
        ("utf8-bytes", GovernorConfig(), None),
        ("chars/4", GovernorConfig(chars_per_token=4), None),
        ("tokenizer", GovernorConfig(), TokenizerEstimator(count_tokens=count_tokens)),
    ]


async def _run_one(
    name: str, governor_config: GovernorConfig, estimator: TokenEstimator | None, args: argparse.Namespace
) -> dict[str, Any]:
    code = f"r = llm_batch(['w' * {args.chars} + str(i) for i in range({args.prompts})])\nprint(len(r))"
    sim_config = SimConfig(
        policies=Policies(
            root=PolicySpec(name="script", options={"replies": [f"```repl\n{code}\n```", "FINAL(done)"]})
        )
    )
    reserved: list[int] = []
    settled: list[int] = []

    def sink(event: Event) -> None:
        if isinstance(event, BudgetReserve) and event.model == "sim-mini":
            reserved.append(event.input_tokens + event.output_tokens)
        elif isinstance(event, BudgetSettle) and event.model == "sim-mini" and event.input_tokens > 0:
            settled.append(event.input_tokens + event.output_tokens)

    async with SimServer(sim_config) as sim:

        def model(name: str) -> ModelConfig:
            return ModelConfig(
                model=name,
                base_url=sim.base_url,
                api_key_env=None,
                prices=ModelPrice.free(),
                max_tokens=MAX_TOKENS,
            )

        config = RLMConfig(
            root=model("sim-model"),
            sub=model("sim-mini"),
            budget=BudgetLimits(max_total_tokens=args.cap),
            governor=governor_config,
            sandbox=SandboxConfig(isolation="auto"),
        )
        governor = Governor(governor_config, estimator=estimator)
        started = time.monotonic()
        async with RLM(config=config, governor=governor, event_sinks=[sink]) as rlm:
            result = await rlm.acompletion("the context", "the query")
        wall = time.monotonic() - started
        subs = [e for e in sim.log.entries if e.kind == "sub" and e.status == 200]
        used = sum(e.prompt_tokens + e.completion_tokens for e in sim.log.entries if e.status == 200)
    mean_reserved = sum(reserved) / len(reserved) if reserved else 0.0
    mean_actual = sum(settled) / len(settled) if settled else 0.0
    return {
        "estimator": name,
        "subcalls_served": len(subs),
        "subcalls_refused": result.total.refused_calls,
        "tokens_used": used,
        "share_of_cap": used / args.cap,
        "mean_reserved_tokens": round(mean_reserved, 1),
        "mean_actual_tokens": round(mean_actual, 1),
        "reservation_to_actual": round(mean_reserved / mean_actual, 3) if mean_actual else None,
        "status": result.status,
        "wall_s": round(wall, 2),
    }


async def _main(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [await _run_one(name, gc, est, args) for name, gc, est in _estimators()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/budget.json")
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--chars", type=int, default=50_000)
    parser.add_argument("--cap", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    rows = anyio.run(_main, args)
    header = f"{'estimator':<12} {'served':>6} {'refused':>7} {'tokens':>9} {'of cap':>7} {'reserved/actual':>15}  status"
    print(f"{args.prompts} prompts x {args.chars:,} chars, max_total_tokens={args.cap:,}")
    print(header)
    for r in rows:
        ratio = r["reservation_to_actual"]
        print(
            f"{r['estimator']:<12} {r['subcalls_served']:>6} {r['subcalls_refused']:>7} {r['tokens_used']:>9,} "
            f"{r['share_of_cap']:>6.1%} {ratio if ratio is not None else '-':>15}  {r['status']}"
        )
    out = {
        **provenance("budget.py", argv if argv is not None else sys.argv[1:]),
        "workload": {"prompts": args.prompts, "chars": args.chars, "cap": args.cap, "max_tokens": MAX_TOKENS},
        "runs": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
