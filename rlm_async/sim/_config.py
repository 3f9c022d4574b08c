"""The simulator's configuration: frozen kw-only dataclasses, loadable from a TOML table.

    [sim]
    seed = 7
    models = ["sim-model", "sim-mini"]

    [sim.latency.root]            # the root model's turns
    ttft_s = 0.5
    prefill_s_per_token = 2e-5    # per *uncached* prompt token
    output_s_per_token = 0.015
    jitter = 0.1                  # latency x U[0.9, 1.1], seeded
    sigma = 0.6                   # and x exp(0.6 z): a lognormal tail (default 0, none)
    capacity = 8                  # served at once; the rest queue FIFO

    [sim.latency.sub]             # sub-calls and anything that is not a root turn
    ttft_s = 0.2

    [sim.cache]
    available_at = "finish"

    [sim.rate_limits]
    rpm = 500
    tpm = 2_000_000

    [sim.faults]
    error_500 = 0.01
    drop = 0.01

    [sim.policies.root]
    name = "rlm"
    chunk_chars = 50_000

`None` (or leaving a key out) disables a limit. `SimConfig.from_dict` reads it with the
package's one TOML loader (`rlm_async._config.load_dataclass`), which rejects unknown keys,
naming them and the file, so a typo in a benchmark's TOML fails loudly instead of silently
meaning "default".
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .._config import load_dataclass, read_toml
from ..exceptions import ConfigError

__all__ = [
    "CacheModel",
    "Faults",
    "KindLatency",
    "LatencyModel",
    "Persona",
    "PolicySpec",
    "RateLimits",
    "SimConfig",
]

_STANDARD_NORMAL = statistics.NormalDist()

Kind = Literal["root", "sub", "other"]
"""What a request is, judged from its system prompt: a root turn of an RLM loop (the
package's root system prompt), a sub-call (the sub-call system prompt), or anything else."""


@dataclass(frozen=True, slots=True, kw_only=True)
class KindLatency:
    """How long one kind of request takes:
    `(ttft_s + prefill_s_per_token * uncached_prompt_tokens + output_s_per_token * completion_tokens)
    * U[1 - jitter, 1 + jitter] * exp(sigma * N(0, 1))`: the uniform jitter and the lognormal
    tail come from the same seeded draw (both rise with it), so a request is slow in both."""

    ttft_s: float = 0.0
    """Fixed time before the first token, whatever the prompt (network, scheduling)."""
    prefill_s_per_token: float = 0.0
    """Time per prompt token that the prefix cache did not cover."""
    output_s_per_token: float = 0.0
    """Time per generated token."""
    jitter: float = 0.0
    """Relative half-width of the seeded multiplicative jitter; 0 makes latency exact."""
    sigma: float = 0.0
    """Lognormal tail: latency times `exp(sigma * z)`, z the draw's standard normal quantile,
    so the median is unchanged and p99 is `exp(2.33 sigma)` x the median (sigma 0.6: 4x).
    Real providers' tails; 0 (the default) has none."""
    capacity: int | None = None
    """Requests of this kind served at once; the rest wait in FIFO order. `None`: no limit."""

    def __post_init__(self) -> None:
        if min(self.ttft_s, self.prefill_s_per_token, self.output_s_per_token) < 0:
            raise ConfigError("latency settings must be >= 0")
        if not 0.0 <= self.jitter < 1.0:
            raise ConfigError(f"jitter must be in [0, 1), got {self.jitter}")
        if not 0.0 <= self.sigma <= 3.0:
            raise ConfigError(f"sigma must be in [0, 3], got {self.sigma}")
        if self.capacity is not None and self.capacity < 1:
            raise ConfigError(f"capacity must be >= 1 or None, got {self.capacity}")


@dataclass(frozen=True, slots=True, kw_only=True)
class LatencyModel:
    """Latency settings per kind. Benchmarks compute critical-path lower bounds with
    `lower_bound(...)` from the same numbers the server sleeps by."""

    root: KindLatency = field(default_factory=KindLatency)
    """Root turns (and final-answer turns: they carry the root system prompt)."""
    sub: KindLatency = field(default_factory=KindLatency)
    """Sub-calls, and requests that are neither root nor sub."""

    def for_kind(self, kind: str) -> KindLatency:
        return self.root if kind == "root" else self.sub

    def phases(
        self,
        kind: str,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
        jitter_u: float = 0.5,
    ) -> tuple[float, float]:
        """(seconds to the first token, seconds of decoding) for one request.

        `jitter_u` is the request's uniform draw in [0, 1): 0.5 is the mean (no jitter),
        0 the fastest the jitter allows."""
        s = self.for_kind(kind)
        factor = 1.0 + s.jitter * (2.0 * jitter_u - 1.0)
        if s.sigma:
            # Clamped so u = 0 (the bound's "fastest draw") stays finite: z >= -6.
            z = _STANDARD_NORMAL.inv_cdf(min(max(jitter_u, 1e-9), 1.0 - 1e-9))
            factor *= math.exp(s.sigma * z)
        first = s.ttft_s + s.prefill_s_per_token * max(0, prompt_tokens - cached_tokens)
        decode = s.output_s_per_token * completion_tokens
        return first * factor, decode * factor

    def latency(
        self,
        kind: str,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
        jitter_u: float = 0.5,
    ) -> float:
        """Service time of one request (queueing under `capacity` not included)."""
        first, decode = self.phases(
            kind,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached_tokens,
            jitter_u=jitter_u,
        )
        return first + decode

    def lower_bound(
        self, kind: str, *, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> float:
        """The least service time the jitter allows for this request."""
        return self.latency(
            kind,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached_tokens,
            jitter_u=0.0,
        )

    @classmethod
    def realistic(cls) -> LatencyModel:
        """Rough hosted-API numbers (a large root model, a small sub model). Picked by hand to
        be plausible, not measured from any provider."""
        return cls(
            root=KindLatency(ttft_s=0.5, prefill_s_per_token=2e-5, output_s_per_token=0.015, jitter=0.1),
            sub=KindLatency(ttft_s=0.25, prefill_s_per_token=1e-5, output_s_per_token=0.006, jitter=0.1),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheModel:
    """Automatic prompt-prefix caching with OpenAI's semantics."""

    enabled: bool = True
    min_tokens: int = 1024
    """Prompts shorter than this are never cached, and no shorter prefix is ever a hit."""
    step_tokens: int = 128
    """Cached prefixes grow in steps of this many tokens (1024, 1152, 1280, ...)."""
    available_at: Literal["finish", "first_token"] = "finish"
    """When a request's prefix becomes usable by others: when it finished (the default, so
    N simultaneous cold requests all miss), or when its first token would have been sent
    (after ttft + prefill), as Anthropic documents for its cache."""
    ttl_s: float | None = 600.0
    """An entry unused for this long is evicted (OpenAI: 5-10 minutes idle). `None`: never."""
    partition_by_cache_key: bool = False
    """Whether `prompt_cache_key` partitions the cache (requests with different keys never
    share entries). Off by default: OpenAI uses the key for routing, not isolation."""

    def __post_init__(self) -> None:
        if self.step_tokens < 1 or self.min_tokens < self.step_tokens:
            raise ConfigError("cache needs step_tokens >= 1 and min_tokens >= step_tokens")
        if self.available_at not in ("finish", "first_token"):
            raise ConfigError(
                f"cache.available_at must be 'finish' or 'first_token', got {self.available_at!r}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class Persona:
    """What the simulated server says it is, for clients that identify servers.

    The default is the simulator itself. `Persona.vllm()` answers as vLLM does:
    `GET /v1/models` cards say `"owned_by": "vllm"` and carry `max_model_len` (the
    `context_window`), and `POST /tokenize` counts a prompt (`{"model", "messages"}` or
    `{"model", "prompt"}` -> `{"count", "max_model_len", "tokens"}`). Pair it with
    `CacheModel(min_tokens=16, step_tokens=16)` for vLLM's 16-token KV blocks."""

    owned_by: str = "rlm-async-sim"
    """`owned_by` of every model card in `GET /v1/models`."""
    report_max_model_len: bool = False
    """Model cards carry `max_model_len` (= `context_window`), as vLLM's and SGLang's do."""
    tokenize: bool = False
    """Serve vLLM's `POST /tokenize`."""

    @classmethod
    def vllm(cls) -> Persona:
        return cls(owned_by="vllm", report_max_model_len=True, tokenize=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimits:
    """OpenAI-style limits, enforced at arrival with continuously refilling buckets."""

    rpm: int | None = None
    """Requests per minute."""
    tpm: int | None = None
    """Tokens per minute, counting prompt tokens + `max_tokens` (0 if the request sent none),
    as OpenAI counts them at admission: unused output is not refunded."""

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"rate_limits.{name} must be >= 1 or None, got {value}")


FaultKind = Literal["ok", "error_500", "error_429", "drop", "malformed", "slow"]
FAULT_KINDS: tuple[str, ...] = ("error_500", "error_429", "drop", "malformed", "slow")


@dataclass(frozen=True, slots=True, kw_only=True)
class Faults:
    """Seeded failures. Each request draws once; the probabilities are exclusive bands."""

    error_500: float = 0.0
    """Answer 500 at once, with an OpenAI-style error body."""
    error_429: float = 0.0
    """Answer 429 at once (provider overload, not the configured limits), with `retry-after`."""
    drop: float = 0.0
    """Serve the request, then close the connection halfway through the response body."""
    malformed: float = 0.0
    """Serve the request, then send a 200 whose JSON body is cut short."""
    slow: float = 0.0
    """Serve the request `slow_extra_s` late."""
    slow_extra_s: float = 5.0
    retry_after_s: float = 1.0
    """What an injected 429 (and 500) asks the client to wait."""
    kinds: tuple[str, ...] = ("root", "sub", "other")
    """Which kinds of request the probabilities apply to."""
    script: tuple[str, ...] = ()
    """Deterministic outcomes for the first requests, in arrival order ("ok" or a fault name),
    before the probabilities take over; e.g. `("drop", "ok", "error_500")`."""

    def __post_init__(self) -> None:
        total = self.error_500 + self.error_429 + self.drop + self.malformed + self.slow
        if min(self.error_500, self.error_429, self.drop, self.malformed, self.slow) < 0 or total > 1:
            raise ConfigError(f"fault probabilities must be >= 0 and sum to <= 1, got a sum of {total}")
        bad = [s for s in self.script if s != "ok" and s not in FAULT_KINDS]
        if bad:
            raise ConfigError(
                f"unknown fault name(s) in faults.script: {bad}; use 'ok' or {list(FAULT_KINDS)}"
            )

    def draw(self, u: float, kind: str) -> str:
        """The fault for a request of `kind` whose seeded uniform draw is `u`, or "ok"."""
        if kind not in self.kinds:
            return "ok"
        edge = 0.0
        for name in FAULT_KINDS:
            edge += getattr(self, name)
            if u < edge:
                return name
        return "ok"


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicySpec:
    """A policy (the simulated model) by registry name, with its options.

    In TOML every key but `name` is an option: `[sim.policies.root] name = "rlm"
    chunks = 100`."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicySpec:
        if "name" not in data:
            raise ConfigError(f"a policy table needs a name, got keys {sorted(data)}")
        options = dict(data.get("options", {}))
        options.update({k: v for k, v in data.items() if k not in ("name", "options")})
        return cls(name=str(data["name"]), options=options)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.options}


@dataclass(frozen=True, slots=True, kw_only=True)
class Policies:
    """Which policy answers which kind of request."""

    root: PolicySpec = field(default_factory=lambda: PolicySpec(name="rlm"))
    sub: PolicySpec = field(default_factory=lambda: PolicySpec(name="reader"))
    other: PolicySpec = field(default_factory=lambda: PolicySpec(name="echo"))

    def for_kind(self, kind: str) -> PolicySpec:
        return self.root if kind == "root" else self.sub if kind == "sub" else self.other


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    """Everything one simulated server needs."""

    seed: int = 0
    """Seeds jitter and faults. Draws are keyed by request content and how many times that
    exact body was seen, so a run is reproducible whatever order concurrent requests arrive in."""
    models: tuple[str, ...] = ("sim-model", "sim-mini")
    """Model names served; any other answers 404 `model_not_found`."""
    api_key: str | None = None
    """If set, requests must send `Authorization: Bearer <api_key>` or get 401."""
    max_output_tokens: int = 16_384
    """Output cap when a request sends no `max_tokens`; longer replies end with
    finish_reason "length"."""
    context_window: int | None = None
    """Prompt + max_tokens above this answers 400 `context_length_exceeded`. `None`: no limit."""
    persona: Persona = field(default_factory=Persona)
    """What the server says it is (`GET /v1/models`, `/tokenize`)."""
    latency: LatencyModel = field(default_factory=LatencyModel)
    cache: CacheModel = field(default_factory=CacheModel)
    rate_limits: RateLimits = field(default_factory=RateLimits)
    faults: Faults = field(default_factory=Faults)
    policies: Policies = field(default_factory=Policies)
    report_usage: bool = True
    """Send a `usage` object in each completion. False plays a server that reports none
    (some proxies and self-hosted servers), so a client cannot learn what it spent."""
    log_path: str | None = None
    """Append one JSON line per finished request here (the in-memory log is always kept)."""
    record_bodies: bool = False
    """Keep each request's parsed JSON body in its log entry (`LogEntry.body`): for tests that
    compare, field by field, what two clients sent. Off by default: bodies of a big fan-out
    are large."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "sim config") -> SimConfig:
        """The `[sim]` table; `source` names where it came from in errors."""
        return load_dataclass(cls, data, "sim", source=source, readers={PolicySpec: PolicySpec.from_dict})

    @classmethod
    def from_toml(cls, path: str | Path, table: str | None = "sim") -> SimConfig:
        """Read a TOML file; `table` names the table to use (dotted), `None` the whole file.
        A file without that table is read whole."""
        data: Any = read_toml(path)
        if table:
            node = data
            for part in table.split("."):
                if not isinstance(node, dict) or part not in node:
                    node = None
                    break
                node = node[part]
            if node is not None:
                data = node
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data that `from_dict` reads back."""
        data: dict[str, Any] = _dump(self)
        return data


# ---------------------------------------------------------------- dumping


def _dump(obj: Any) -> Any:
    if isinstance(obj, PolicySpec):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            out[f.name] = _dump(getattr(obj, f.name))
        return out
    if isinstance(obj, tuple):
        return [_dump(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: _dump(v) for k, v in obj.items()}
    return obj
