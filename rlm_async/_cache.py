"""The prefix-cache planner: how a batch of sub-calls should be sent so that providers'
prefix caches serve the part every request shares. Pure logic: no I/O, no clock.

An `llm_batch` fans out N requests that start with the same system prompt and static
instructions and end with different chunks. Providers cache prompt prefixes, but a prefix
is cached only once a request carrying it has been processed; N requests sent at the
same moment all miss. So, when it pays:

    plan = plan_batch(requests, settings, expected_latency_s=4.0)
    emit(WarmupDecision, **plan.event_fields())
    send plan.requests[i] for i in plan.warmups; when they finish, send the rest.

* **Warm, then fan out.** One request per cache bucket goes first; the rest of its bucket
  follows once it has finished, and hits the cache.
* **When it pays.** Warming never costs money: the warm-up is one of the batch's own
  requests. It costs time — the rest of the batch waits about one request latency. What
  it buys is prefill of the shared prefix at the cached price (50–90% off at OpenAI) for
  every other request. Time and tokens do not compare without an exchange rate, so the
  rule takes one, `min_saved_tokens_per_wait_s`: warm when

        (requests that would hit) × (cacheable prefix tokens) / (expected wait, s)
            ≥ min_saved_tokens_per_wait_s

  The default, 2,000 tokens per second of waiting, warms a 4k-token prefix from about 6
  requests and a bare 1,024-token prefix from about 21 (at a 10 s latency): small batches,
  where the wait would double the batch's time for a few cents, go out at once. (Cached
  prefill is also faster, but requests run in parallel, so that rarely wins the wait back.)
  Before the rule: a prefix below the provider's cacheable minimum is never warmed (it
  cannot be cached), nor a batch of one (nothing to share).
* **Cache keys, bucketed.** OpenAI routes by a hash of about the first 256 tokens plus
  `prompt_cache_key`, and one prefix+key keeps to a machine only up to ~15 requests a
  minute; beyond that requests spill to cold machines. With `send_prompt_cache_key` the
  batch is split into `ceil(N / (per_key_rpm × minutes the batch spans))` buckets, each
  with its own key and its own warm-up. Keys are a hash of the model and the start of the
  shared prefix plus the bucket index: byte-identical across runs, and the same for later
  batches with the same instructions, so they land on machines already warm.

What it is not: a guarantee of hits (providers evict, route and round as they please;
`RLMResult.by_depth[d].cache_hit_ratio` reports what actually happened), or a tokenizer (tokens are estimated as
characters / `chars_per_token`, which under-counts code and non-English text — the safe
direction for the cacheable-minimum test).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Container, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

from ._prompt_batch import common_prefix_len
from ._types import ModelRequest, PrefixedMessage
from .exceptions import ConfigError

__all__ = [
    "BatchPlan",
    "CacheSettings",
    "SharedPrefix",
    "WarmReason",
    "cacheable_tokens",
    "plan_batch",
    "shared_prefix",
]

ReadyOn = Literal["first_token", "finish"]

WarmReason = Literal[
    "too_few_requests",
    "prefix_below_minimum",
    "disabled",
    "already_warm",
    "forced",
    "batch_too_small",
    "pays_off",
]
"""Why a batch was (not) warmed, as recorded in the `warmup.decision` event."""

_KEY_WINDOW_CHARS = 4096
"""How much of the shared prefix names its cache key. OpenAI routes on about the first 256
tokens (~1,000 characters); hashing a little more than that, but not the whole prefix,
keeps the key the same for later batches with the same instructions even when their
chunks happen to share a few more leading characters."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheSettings:
    """How one provider caches prompt prefixes, and how eagerly to warm it.

    The default suits an unknown OpenAI-compatible server: cache from 1,024 tokens, warm
    when it pays, send no cache key. Use `CacheSettings.openai()`, `.vllm()` or `.sglang()`
    for those servers.
    """

    min_cacheable_tokens: int = 1024
    """Shortest prefix the provider caches (OpenAI: 1,024; vLLM: one 16-token block; SGLang:
    any prefix)."""
    step_tokens: int = 128
    """The provider caches whole steps of this many tokens (OpenAI: 128; vLLM: its KV block
    size, 16 by default; SGLang: 1). 0 or 1 means token granularity."""
    warm: bool | Literal["auto"] = "auto"
    """Warm-then-fan-out: always (`True`), never (`False`), or when the rule in the module
    docstring says it pays (`"auto"`)."""
    ready_on: ReadyOn = "finish"
    """When the provider's cache entry becomes usable: after the first token ("first_token":
    OpenAI, Anthropic — "wait for the first response before sending subsequent requests")
    or only once the request finishes. The engine sends non-streaming calls and only sees
    them finish, so it releases a bucket at finish either way; this records what a
    streaming sender could do."""
    send_prompt_cache_key: bool = False
    """Set `prompt_cache_key` on requests (OpenAI). Off for servers that ignore or reject it."""
    per_key_rpm: int | None = None
    """Requests per minute one prefix+key may carry before the provider spills to cold
    machines (OpenAI: about 15). `None`: no limit, one key for the whole batch."""
    chars_per_token: float = 4.0
    """For estimating tokens from characters (English prose is about 4)."""
    assumed_latency_s: float = 10.0
    """Latency assumed for a warm-up when the caller has no measurement to pass."""
    min_saved_tokens_per_wait_s: float = 2000.0
    """The exchange rate of the `"auto"` rule: warm only when the prefix tokens that would
    hit the cache, divided by the seconds the batch waits for its warm-up, reach this."""

    def __post_init__(self) -> None:
        if self.min_cacheable_tokens < 0 or self.step_tokens < 0:
            raise ConfigError(
                f"min_cacheable_tokens ({self.min_cacheable_tokens}) and step_tokens "
                f"({self.step_tokens}) must not be negative"
            )
        if self.warm not in (True, False, "auto"):
            raise ConfigError(f"warm must be true, false or 'auto', not {self.warm!r}")
        if self.ready_on not in ("first_token", "finish"):
            raise ConfigError(f"ready_on must be 'first_token' or 'finish', not {self.ready_on!r}")
        if self.per_key_rpm is not None and self.per_key_rpm < 1:
            raise ConfigError(f"per_key_rpm is {self.per_key_rpm}; use at least 1, or None for no limit")
        if not self.chars_per_token > 0:
            raise ConfigError(f"chars_per_token is {self.chars_per_token}; it must be positive (about 4)")
        if not self.assumed_latency_s > 0 or self.min_saved_tokens_per_wait_s < 0:
            raise ConfigError(
                f"assumed_latency_s ({self.assumed_latency_s}) must be positive and "
                f"min_saved_tokens_per_wait_s ({self.min_saved_tokens_per_wait_s}) not negative"
            )

    @classmethod
    def openai(cls) -> CacheSettings:
        """OpenAI: automatic caching from 1,024 tokens in 128-token steps, usable once the
        first request has been processed, routed by `prompt_cache_key`, ~15 RPM per key."""
        return cls(
            min_cacheable_tokens=1024,
            step_tokens=128,
            warm="auto",
            ready_on="first_token",
            send_prompt_cache_key=True,
            per_key_rpm=15,
        )

    @classmethod
    def vllm(cls) -> CacheSettings:
        """vLLM with automatic prefix caching (on by default): whole KV blocks of 16 tokens,
        so nothing shorter than one block. A block is reused once the request that computed
        it has been processed; requests admitted together all compute it, so a fan-out sent
        cold mostly misses. Warm when the rule says it pays (what `server = "auto"` picks
        for a server identified as vLLM)."""
        return cls(min_cacheable_tokens=16, step_tokens=16, warm="auto", ready_on="finish")

    @classmethod
    def sglang(cls) -> CacheSettings:
        """SGLang's RadixAttention: any prefix, token granularity, inserted once a request's
        prefill is done; warm when the rule says it pays, as for vLLM."""
        return cls(min_cacheable_tokens=0, step_tokens=1, warm="auto", ready_on="first_token")


class SharedPrefix(NamedTuple):
    """The common start of a batch's prompts."""

    chars: int
    """Characters of message content (and role changes) every request starts with."""
    tokens: int
    """Estimated tokens: chars / `chars_per_token`, rounded down."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchPlan:
    """How to send one batch. `requests` are the input requests in the input order, with
    `prompt_cache_key` filled in where the plan assigns one."""

    requests: tuple[ModelRequest, ...]
    decision: Literal["warm", "skip"]
    reason: WarmReason
    detail: str
    """The numbers behind `reason`, in words, for the trace."""
    prefix_chars: int
    prefix_tokens: int
    """Estimated shared-prefix tokens."""
    cacheable_tokens: int
    """Of those, what the provider would cache: 0 below the minimum, else whole steps."""
    buckets: tuple[str, ...]
    """One id per cache bucket: its `prompt_cache_key`, or a prefix id when keys are off.
    Remember the ids of buckets warmed recently and pass them as `already_warm`."""
    bucket_of: tuple[int, ...]
    """The bucket of each request (an index into `buckets`)."""
    warmups: tuple[int, ...]
    """Indices of the requests to send first, one per bucket to warm; empty when skipping."""
    release_on: ReadyOn
    """When a warm-up's bucket may follow (see `CacheSettings.ready_on`)."""

    @property
    def batch_size(self) -> int:
        return len(self.requests)

    def gate(self, index: int) -> int | None:
        """The warm-up request that request `index` must wait for, or `None` to send it now.

        If a warm-up fails, release its bucket anyway: the rest then simply go cold.
        """
        if index in self.warmups:
            return None
        bucket = self.bucket_of[index]
        return next((w for w in self.warmups if self.bucket_of[w] == bucket), None)

    def event_fields(self) -> dict[str, Any]:
        """Fields of the `warmup.decision` event."""
        return {
            "decision": self.decision,
            "reason": self.reason,
            "prefix_tokens": self.prefix_tokens,
            "batch_size": self.batch_size,
            "cacheable_tokens": self.cacheable_tokens,
            "buckets": len(self.buckets),
            "warmups": len(self.warmups),
            "detail": self.detail,
        }


def shared_prefix(requests: Sequence[ModelRequest], *, chars_per_token: float = 4.0) -> SharedPrefix:
    """The byte-identical common prefix of the batch's messages, in characters and estimated
    tokens. Requests for different models share nothing (each model has its own cache)."""
    chars = len(_shared_prefix_text(requests))
    return SharedPrefix(chars, int(chars / chars_per_token))


def cacheable_tokens(prefix_tokens: int, settings: CacheSettings) -> int:
    """What the provider would cache of a prefix: nothing below its minimum, else the
    prefix rounded down to whole steps."""
    if prefix_tokens <= 0 or prefix_tokens < settings.min_cacheable_tokens:
        return 0
    step = settings.step_tokens
    return prefix_tokens if step <= 1 else prefix_tokens // step * step


def plan_batch(
    requests: Sequence[ModelRequest],
    settings: CacheSettings,
    *,
    expected_latency_s: float | None = None,
    rpm_hint: float | None = None,
    already_warm: Container[str] = frozenset(),
) -> BatchPlan:
    """Decide how to send `requests` (see the module docstring for the rule).

    `expected_latency_s`: how long the warm-up is expected to take (e.g. a moving average of
    recent calls to this model); `None` uses `settings.assumed_latency_s`.
    `rpm_hint`: requests per minute this batch will actually go out at (the governor's RPM
    limit for the model), to estimate how many minutes it spans and so how many requests
    one cache key may carry; `None` assumes the whole batch goes within a minute.
    `already_warm`: bucket ids (see `BatchPlan.buckets`) warmed recently enough to still be
    cached; their buckets are sent at once.
    """
    n = len(requests)
    text = _shared_prefix_text(requests)
    prefix = SharedPrefix(len(text), int(len(text) / settings.chars_per_token))
    cacheable = cacheable_tokens(prefix.tokens, settings)
    layout = _layout(requests, settings, text, cacheable, rpm_hint, already_warm)
    latency = expected_latency_s if expected_latency_s is not None else settings.assumed_latency_s
    decision, reason, detail = _decide(n, prefix, cacheable, layout, settings, latency)
    return BatchPlan(
        requests=layout.requests,
        decision=decision,
        reason=reason,
        detail=detail,
        prefix_chars=prefix.chars,
        prefix_tokens=prefix.tokens,
        cacheable_tokens=cacheable,
        buckets=layout.buckets,
        bucket_of=layout.bucket_of,
        warmups=layout.firsts if decision == "warm" else (),
        release_on=settings.ready_on,
    )


class _Layout(NamedTuple):
    """How a batch is spread over cache buckets, and which request warms each cold one."""

    requests: tuple[ModelRequest, ...]
    buckets: tuple[str, ...]
    bucket_of: tuple[int, ...]
    firsts: tuple[int, ...]
    """The first request of every bucket not already warm: sent first if the batch is warmed."""
    cold_requests: int
    """Requests in buckets that are not warm yet."""


def _layout(
    requests: Sequence[ModelRequest],
    settings: CacheSettings,
    text: str,
    cacheable: int,
    rpm_hint: float | None,
    already_warm: Container[str],
) -> _Layout:
    n = len(requests)
    model = requests[0].model if requests else ""
    n_buckets = _bucket_count(n, settings, rpm_hint) if cacheable else 1
    base_id = "rlm-" + _digest(model, text[:_KEY_WINDOW_CHARS])[:16]
    keyed = settings.send_prompt_cache_key and cacheable > 0
    buckets = tuple(f"{base_id}-{b}" for b in range(n_buckets)) if keyed else (base_id,)
    bucket_of = tuple(i % n_buckets for i in range(n))
    planned = tuple(
        replace(r, prompt_cache_key=buckets[bucket_of[i]]) if keyed and r.prompt_cache_key is None else r
        for i, r in enumerate(requests)
    )
    first_of: dict[int, int] = {}
    for i, b in enumerate(bucket_of):
        first_of.setdefault(b, i)
    cold = {b for b in first_of if buckets[b] not in already_warm}
    firsts = tuple(sorted(first_of[b] for b in cold))
    cold_requests = sum(1 for b in bucket_of if b in cold)
    return _Layout(planned, buckets, bucket_of, firsts, cold_requests)


def _decide(
    n: int,
    prefix: SharedPrefix,
    cacheable: int,
    layout: _Layout,
    settings: CacheSettings,
    latency: float,
) -> tuple[Literal["warm", "skip"], WarmReason, str]:
    """Warm or not, why (a `WarmReason`), and the numbers behind it."""
    if n < 2:
        return "skip", "too_few_requests", f"{n} request(s): nothing to share"
    if cacheable == 0:
        return (
            "skip",
            "prefix_below_minimum",
            f"shared prefix ~{prefix.tokens} tokens; the provider caches from "
            f"{max(settings.min_cacheable_tokens, 1)}",
        )
    if settings.warm is False:
        return "skip", "disabled", "warm-up is off for this provider"
    if not layout.firsts:
        return "skip", "already_warm", f"all {len(layout.buckets)} bucket(s) were warmed recently"
    if settings.warm is True:
        return "warm", "forced", f"warm-up forced; {len(layout.firsts)} bucket(s) to warm"
    saved = (layout.cold_requests - len(layout.firsts)) * cacheable
    rate = saved / max(latency, 1e-3)
    detail = (
        f"~{saved} prefix tokens would hit for a ~{latency:g}s wait: {rate:.0f} tokens/s "
        f"(threshold {settings.min_saved_tokens_per_wait_s:g})"
    )
    if rate < settings.min_saved_tokens_per_wait_s:
        return "skip", "batch_too_small", detail
    return "warm", "pays_off", detail


def _bucket_count(n: int, settings: CacheSettings, rpm_hint: float | None) -> int:
    if not settings.send_prompt_cache_key or settings.per_key_rpm is None or n == 0:
        return 1
    # A batch spread over several minutes (by the governor's RPM limit) lets each key carry
    # per_key_rpm in each of them; anything sent within one minute counts against one.
    minutes = max(1.0, n / rpm_hint) if rpm_hint else 1.0
    return max(1, math.ceil(n / (settings.per_key_rpm * minutes)))


def _shared_prefix_text(requests: Sequence[ModelRequest]) -> str:
    """The common prefix of the requests' messages, read message by message: each message
    is its role followed by its content, and a role change ends the shared prefix, as it
    does in every chat template. Role names count (a fair stand-in for a template's
    per-message tokens).

    Whole messages that every request shares are compared by identity or equality (a
    fan-out's system prompt is one object); at the first message that differs, the common
    prefix of its contents is that of their lexicographic min and max. No prompt is
    copied: rendering each request into one string, as this did before, copied the whole
    fan-out (63 MB at 5,000 sub-calls) to find a prefix of a few kilobytes."""
    if not requests:
        return ""
    model = requests[0].model
    if any(r.model != model for r in requests):
        return ""
    parts: list[str] = []
    for k in range(min(len(r.messages) for r in requests)):
        first = requests[0].messages[k]
        if any(r.messages[k].role != first.role for r in requests):
            break
        messages = [r.messages[k] for r in requests]
        head = first.prefix if isinstance(first, PrefixedMessage) else ""
        prefixed = (
            [m for m in messages if isinstance(m, PrefixedMessage) and m.prefix is head] if head else []
        )
        if head and len(prefixed) == len(messages):
            # A fan-out's prompts with their prefix held once: compared past it, not joined.
            contents = [m.rest for m in prefixed]
        else:
            head, contents = "", [m.content for m in messages]
        if all(c is contents[0] or c == contents[0] for c in contents):
            parts.append(first.role + head + contents[0])
            continue
        lo, hi = min(contents), max(contents)
        parts.append(first.role + head + lo[: common_prefix_len(lo, hi)])
        break
    return "".join(parts)


def _digest(model: str, text: str) -> str:
    return hashlib.sha256(f"{model}\x00{text}".encode("utf-8", "surrogatepass")).hexdigest()
