"""A simulated OpenAI-compatible model server, for tests and benchmarks without a real model.

`rlm_async.sim` serves `POST /v1/chat/completions` and `GET /v1/models` on loopback. Its
"model" is a scripted policy that plays an RLM for real: the root policy reads the query and
the context metadata, writes ```repl code that chunks `context` and fans out with
`llm_batch`, and the sub policy answers each chunk — so the engine runs its whole loop
(code execution, sub-calls, aggregation) over real HTTP, with a known right answer.

    from rlm_async.sim import SimConfig, SimServer, KindLatency, LatencyModel

    config = SimConfig(latency=LatencyModel(sub=KindLatency(ttft_s=0.2, capacity=64)))
    async with SimServer(config) as sim:          # 127.0.0.1, a free port, this event loop
        run_engine_against(sim.base_url)          # "http://127.0.0.1:<port>/v1"
        print(sim.log.max_in_flight(), sim.log.totals())

For benchmarks, `SimProcess(config)` runs the same server in a child process (its own
core), and `rlm-async sim --config sim.toml` (or `python -m rlm_async.sim`) runs it by hand.

What it simulates
-----------------
- **Latency**: `ttft + prefill_per_token x uncached prompt tokens + per_output_token x
  completion tokens`, times a seeded jitter, with separate settings for root turns and
  sub-calls, and an optional capacity per kind (requests served at once; the rest queue in
  FIFO order). `LatencyModel.latency(...)` / `.lower_bound(...)` compute the same numbers
  for a benchmark's critical-path bound.
- **Tokens**: 4 characters of a canonical serialization are one token (`prompt_tokens()`),
  so clients can predict usage exactly. Every response carries `usage`, including
  `prompt_tokens_details.cached_tokens`.
- **Prefix caching** with OpenAI's semantics: prompts of 1024+ tokens, hits in 128-token
  steps, an entry usable only once the request that wrote it finished (or, configurably,
  once its first token was due) — so N simultaneous cold requests all miss. Cached tokens
  skip prefill.
- **Rate limits**: RPM and TPM (prompt + `max_tokens`), 429 with `retry-after`,
  `retry-after-ms` and `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (resets as
  Go durations such as `12ms`, `6m0s`); the `x-ratelimit-*` headers come on successes too.
- **Faults**, seeded or scripted: 500s, 429s, dropped connections (closed mid-body),
  malformed JSON bodies, slow responses.
- **Errors as OpenAI sends them**: unknown model 404 `model_not_found`, bad JSON 400, wrong
  API key 401 (when one is configured), `context_length_exceeded` past `context_window`.
- **A request log** (`sim.log`, and JSONL at `log_path`): arrival, service start, finish,
  kind (root/sub/other, from the system prompt), model, prompt/cached/completion tokens,
  status, outcome, requests in flight at arrival, a SHA-256 of the request body
  (`body_sha256`, to spot repeated requests). Helpers: `max_in_flight()`,
  `peak_concurrency()`, `by_arrival()`, `totals()`. Each served request also logs
  `modeled_s`, the service time the latency model drew for it (jitter included).
- **Critical-path bounds** (`critical_path(log, latency)`, `critical_path_bound(...)`, in
  `rlm_async.sim.bound`): the least wall time the latency model allows for the requests a
  run made (root turns in sequence, plus the slowest sub-call of each fan-out, or the
  capacity / rate-limit terms when larger), to judge how close an engine comes to it.

Policies are chosen by name per kind (`SimConfig.policies`): `rlm` (root), `reader` (sub),
`echo`, `fixed`, and misbehaving ones: `no_code`, `syntax_error`, `endless`,
`never_answers`, `huge_fanout`, `unhelpful`. See `rlm_async.sim.policies`.

What it is not: a model. Answers come from an exact oracle over the synthetic workloads in
`rlm_async.workloads`; any other question gets an answer that opens with `NOT_AN_ANSWER`
("rlm_async.sim cannot answer this question: ..."), never a confident guess; the latency numbers are whatever you configure (`LatencyModel.
realistic()` is a hand-picked guess, not a measurement). `SimServer` needs the asyncio
backend. It binds 127.0.0.1 only, unless the command line is told otherwise.
"""

from ._config import (
    CacheModel,
    Faults,
    KindLatency,
    LatencyModel,
    Persona,
    Policies,
    PolicySpec,
    RateLimits,
    SimConfig,
)
from ._log import LogEntry, LogTail, RequestLog, priced
from ._prefix_cache import PrefixCache
from ._ratelimit import RateLimiter, go_duration
from ._tokens import count_tokens, prompt_tokens, serialize_messages
from .bound import CriticalPath, FanoutBound, critical_path, critical_path_bound
from .policies import NOT_AN_ANSWER, PolicyRequest, make_policy, policy_names
from .server import SimProcess, SimServer, main, serve

__all__ = [
    "NOT_AN_ANSWER",
    "CacheModel",
    "CriticalPath",
    "FanoutBound",
    "Faults",
    "KindLatency",
    "LatencyModel",
    "LogEntry",
    "LogTail",
    "Persona",
    "Policies",
    "PolicyRequest",
    "PolicySpec",
    "PrefixCache",
    "RateLimiter",
    "RateLimits",
    "RequestLog",
    "SimConfig",
    "SimProcess",
    "SimServer",
    "count_tokens",
    "critical_path",
    "critical_path_bound",
    "go_duration",
    "main",
    "make_policy",
    "policy_names",
    "priced",
    "prompt_tokens",
    "serialize_messages",
    "serve",
]
