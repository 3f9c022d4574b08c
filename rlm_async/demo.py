"""The built-in demo: a large synthetic haystack, the simulator in a child process, one RLM
query that fans out to hundreds of chunks, and a report of what it took.

No API key, no network: the "models" are the simulator's scripted policies over a seeded
workload whose right answer is known, so the report can say whether the answer is right.
The prices are stand-ins (`DEMO_PRICES`), not any provider's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import _events
from ._cache import CacheSettings
from ._config import ModelConfig, RLMConfig
from ._governor import GovernorConfig, ModelPrice
from ._result import RLMResult
from ._rlm import RLM
from .exceptions import ConfigError
from .sim import KindLatency, LatencyModel, Policies, PolicySpec, SimConfig, SimProcess
from .sim.bound import critical_path_bound
from .workloads import Workload, make_workload, parse_size

__all__ = ["DEMO_PRICES", "DemoReport", "critical_path_bound", "demo_config", "run_demo"]

DEMO_PRICES = {
    # Stand-in prices (USD per million tokens) shaped like a large root model and a small
    # sub model with a 90% cached-input discount. Not any provider's published prices.
    "sim-model": ModelPrice(input_per_mtok=1.25, cached_input_per_mtok=0.125, output_per_mtok=10.0),
    "sim-mini": ModelPrice(input_per_mtok=0.25, cached_input_per_mtok=0.025, output_per_mtok=2.0),
}

DEMO_LATENCY = LatencyModel(
    root=KindLatency(ttft_s=0.4, prefill_s_per_token=1e-5, output_s_per_token=0.004, jitter=0.1),
    sub=KindLatency(ttft_s=0.3, prefill_s_per_token=1e-5, output_s_per_token=0.004, jitter=0.1),
)


def demo_config(base_url: str, *, cache: bool = True) -> RLMConfig:
    """The RLM configuration the demo and the fan-out benchmark use against the simulator."""
    cache_settings = CacheSettings() if cache else CacheSettings(warm=False)
    return RLMConfig(
        root=ModelConfig(
            model="sim-model",
            base_url=base_url,
            api_key_env=None,
            max_tokens=2048,
            prices=DEMO_PRICES["sim-model"],
            cache=cache_settings,
        ),
        sub=ModelConfig(
            model="sim-mini",
            base_url=base_url,
            api_key_env=None,
            max_tokens=256,
            prices=DEMO_PRICES["sim-mini"],
            cache=cache_settings,
        ),
        # The simulator's tokenizer is 4 characters a token, so budgets can reserve exactly.
        governor=GovernorConfig(chars_per_token=4.0),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoReport:
    task: str
    query: str
    context_tokens: int
    chunks: int
    result: RLMResult
    correct: bool
    truth: Any
    requests: int
    peak_in_flight: int
    bound_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "query": self.query,
            "context_tokens": self.context_tokens,
            "chunks": self.chunks,
            "answer": self.result.response,
            "truth": self.truth,
            "correct": self.correct,
            "status": self.result.status,
            "requests": self.requests,
            "peak_in_flight": self.peak_in_flight,
            "wall_s": round(self.result.execution_time, 3),
            "critical_path_bound_s": round(self.bound_s, 3),
            "result": self.result.to_dict(),
        }


def sim_config(chunks: int, *, latency: LatencyModel = DEMO_LATENCY, seed: int = 0) -> SimConfig:
    return SimConfig(
        seed=seed,
        latency=latency,
        policies=Policies(
            root=PolicySpec(name="rlm", options={"chunks": chunks, "max_chunks": max(chunks, 1000)})
        ),
    )


async def run_demo(
    *,
    task: str = "counting",
    tokens: str | int = "1M",
    chunks: int = 200,
    seed: int = 0,
    event_sinks: Sequence[_events.EventSink] = (),
) -> DemoReport:
    # Checked here, in this process: the simulator's process would refuse them only as it
    # starts, and its traceback would be all the caller saw.
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ConfigError(f"chunks is {chunks!r}; the demo fans out to at least 1 chunk")
    try:
        size = parse_size(tokens)
    except ValueError as exc:
        raise ConfigError(f"tokens: {exc}") from None
    if size < 1:
        raise ConfigError(f"tokens is {tokens!r}; the demo's context needs at least 1 token (e.g. 1M)")
    workload: Workload = make_workload(task, size, seed=seed)
    with SimProcess(sim_config(chunks, seed=seed)) as sim:
        assert sim.base_url is not None
        async with RLM(config=demo_config(sim.base_url)) as rlm:
            result = await rlm.acompletion(workload.context, workload.query, event_sinks=event_sinks)
    log = sim.read_log()
    return DemoReport(
        task=task,
        query=workload.query,
        context_tokens=workload.tokens,
        chunks=chunks,
        result=result,
        correct=workload.score(result.response or ""),
        truth=workload.truth,
        requests=len(log),
        peak_in_flight=log.max_in_flight(),
        bound_s=critical_path_bound(log, DEMO_LATENCY),
    )
