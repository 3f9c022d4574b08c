"""Run-wide limits per endpoint+model: concurrency, requests/minute, tokens/minute, and the
shared pause after a 429. Every query in the process draws from the same `LimitState`.

Admission order for one attempt: the pause gate, a concurrency slot, one request from the
RPM bucket, prompt-estimate + `max_tokens` from the TPM bucket (OpenAI's counting rule),
the pause gate again, then the wire. Concurrency comes first so a request leaves right after
it gets its rate tokens instead of spending them while queued for a slot. After the
response the TPM bucket keeps what the server counts (reported prompt + `max_tokens` by
default; see `tpm_charges_max_tokens`) and refunds the rest of the estimate.

Adaptive behaviour:
* A 429 (or any retryable error that names a `retry-after`) pauses the endpoint+model for
  everyone until then: one "paused until" time and one sleeping task (the gate's keeper),
  not one sleeping task per request, so the queue does not wake up as a herd. The scope is
  the limit key, because providers limit per model. `shared_pause=False` turns it off.
* Concurrency shrinks multiplicatively on retryable errors, once per "round": errors from
  requests admitted before the last shrink do not shrink it again (a burst of 100 failures
  is one congestion signal, not 100). It grows by one slot after as many successes as the
  current limit, up to the configured maximum (TCP's additive increase).
* `x-ratelimit-remaining-*` / `reset-*` headers lower the local bucket when the server has
  less than we think (other processes share the key); a sent `x-ratelimit-limit-*` creates
  the bucket when none was configured, or lowers a configured one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel

from .._checks import is_number, is_whole_number
from .._descriptors import connection_budget
from .._events import LimiterResize, LimiterWait, RateLimitPause, emit
from .._types import Completion, RateLimitInfo
from ..exceptions import ConfigError, FatalError, RateLimited, RetryableError
from ._clock import Clock, Sleep
from ._token_bucket import TokenBucket

__all__ = ["EndpointLimits", "LimitRegistry", "LimitState", "Permit", "RequestTooLarge"]


class RequestTooLarge(FatalError):
    """One request needs more tokens than the tokens-per-minute limit holds: it can never be
    sent. Like `ContextLengthExceeded`, the fix is a smaller prompt or a lower `max_tokens`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointLimits:
    """Limits for one endpoint+model, shared by every query in the process. `None` disables."""

    max_concurrency: int | None = field(default_factory=lambda: connection_budget().connections)
    """Requests in flight at once; the adaptive limit never goes above it. The default is
    the transport's connection-pool size, which the process's descriptor limit sets
    (`_descriptors.connection_budget`): rate limits, not this, are what providers state."""
    min_concurrency: int = 1
    """Floor for the adaptive limit."""
    adaptive: bool = True
    """Shrink concurrency on retryable errors, grow it back on successes."""
    decrease_factor: float = 0.5
    """Multiplier applied to the concurrency limit on a congestion signal."""
    requests_per_minute: float | None = None
    """Requests per minute (a bucket of that many, refilled continuously)."""
    tokens_per_minute: int | None = None
    """Tokens per minute, counted as prompt estimate + `max_tokens` at admission and
    corrected to what the server counts after the response (`tpm_charges_max_tokens`)."""
    tpm_charges_max_tokens: bool = True
    """The server's TPM meter keeps `max_tokens` whatever the reply used (OpenAI and the
    simulator count prompt + `max_tokens` at admission, and refund nothing): after a response
    only the prompt estimate is corrected to the reported prompt tokens. `False` for a server
    that meters actual usage: unused output is refunded too."""
    learn_from_headers: bool = True
    """Apply the server's `x-ratelimit-*` headers to the local buckets."""
    shared_pause: bool = True
    """A 429 (or an error naming a `retry-after`) pauses this endpoint+model for every caller;
    `False` leaves the waiting to each failed call's own backoff."""
    pause_without_retry_after_s: float = 1.0
    """How long a 429 that names no `retry-after` pauses the endpoint+model."""

    def __post_init__(self) -> None:
        for name in ("max_concurrency", "min_concurrency"):
            value = getattr(self, name)
            if value is not None and not is_whole_number(value):
                raise ConfigError(f"EndpointLimits.{name} is {value!r}; use a whole number >= 1")
        for name in (
            "requests_per_minute",
            "tokens_per_minute",
            "decrease_factor",
            "pause_without_retry_after_s",
        ):
            value = getattr(self, name)
            if value is not None and not is_number(value):
                raise ConfigError(f"EndpointLimits.{name} is {value!r}; use a number")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ConfigError(f"EndpointLimits.max_concurrency is {self.max_concurrency}; use >= 1 or None")
        if self.min_concurrency < 1:
            raise ConfigError(f"EndpointLimits.min_concurrency is {self.min_concurrency}; use >= 1")
        if self.max_concurrency is not None and self.min_concurrency > self.max_concurrency:
            raise ConfigError(
                f"EndpointLimits.min_concurrency ({self.min_concurrency}) is above "
                f"max_concurrency ({self.max_concurrency})"
            )
        if not 0 < self.decrease_factor < 1:
            raise ConfigError(f"EndpointLimits.decrease_factor is {self.decrease_factor}; use 0 < f < 1")
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"EndpointLimits.{name} is {value}; use a number > 0, or None for no limit")
        if not self.pause_without_retry_after_s >= 0:
            raise ConfigError(
                f"EndpointLimits.pause_without_retry_after_s is {self.pause_without_retry_after_s}; use >= 0"
            )


class PauseGate:
    """ "Paused until T" for everyone behind one endpoint+model. While paused, the first
    waiter sleeps until T (the keeper); the rest wait on one event it sets."""

    def __init__(self, clock: Clock, sleep: Sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        self._until = -math.inf
        self._keeper = False
        self._opened = anyio.Event()

    @property
    def paused_until(self) -> float:
        return self._until

    @property
    def paused(self) -> bool:
        return self._clock() < self._until

    def pause(self, seconds: float) -> bool:
        """Pause until now + `seconds` unless already paused longer; True if extended."""
        until = self._clock() + seconds
        if until <= self._until:
            return False
        self._until = until
        return True

    async def wait(self) -> None:
        while self._clock() < self._until:
            if self._keeper:
                await self._opened.wait()
                continue
            self._keeper = True
            try:
                await self._sleep(self._until - self._clock())
            finally:
                self._keeper = False
                opened, self._opened = self._opened, anyio.Event()
                opened.set()  # everyone re-checks; if still paused, one of them keeps the time


class Permit:
    """What one attempt holds from the limits; give it back with `LimitState.release`."""

    __slots__ = ("epoch", "limiter", "output_tokens", "requests", "rpm", "sent", "tokens", "tpm", "waited_s")

    def __init__(self) -> None:
        self.limiter: anyio.CapacityLimiter | None = None
        self.rpm: TokenBucket | None = None
        self.tpm: TokenBucket | None = None
        self.requests = 0
        self.tokens = 0
        self.output_tokens = 0
        """Of `tokens`, the output allowance (`max_tokens`)."""
        self.sent = False
        """Set by the caller just before the request goes on the wire."""
        self.epoch = 0
        self.waited_s = 0.0


class LimitState:
    """The live limits of one endpoint+model in one event loop."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        config: EndpointLimits,
        *,
        clock: Clock,
        sleep: Sleep,
        retry_after_cap_s: float = 60.0,
    ) -> None:
        self.endpoint = endpoint
        self.model = model
        self._clock = clock
        self._sleep = sleep
        self.retry_after_cap_s = retry_after_cap_s
        self.gate = PauseGate(clock, sleep)
        self.config = config
        self._limiter: anyio.CapacityLimiter | None = None
        self._rpm: TokenBucket | None = None
        self._tpm: TokenBucket | None = None
        self._epoch = 0
        self._successes = 0
        self.pauses = 0
        self.shrinks = 0
        self.grows = 0
        self._apply(config)

    # ------------------------------------------------------------------ configuration
    def _apply(self, config: EndpointLimits) -> None:
        self.config = config
        if config.max_concurrency is None:
            self._limiter = None
        elif self._limiter is None:
            self._limiter = anyio.CapacityLimiter(config.max_concurrency)
        else:
            self._limiter.total_tokens = config.max_concurrency
        self._rpm = self._bucket(self._rpm, config.requests_per_minute)
        self._tpm = self._bucket(self._tpm, config.tokens_per_minute)

    def _bucket(self, bucket: TokenBucket | None, capacity: float | None) -> TokenBucket | None:
        if capacity is None:
            return None
        if bucket is None:
            return TokenBucket(capacity, clock=self._clock, sleep=self._sleep)
        bucket.resize(capacity)
        return bucket

    def reconfigure(self, config: EndpointLimits) -> None:
        """Apply new limits now (concurrency resizes in place; waiting tasks keep their place)."""
        if config != self.config:
            self._apply(config)

    def resize(self, **changes: Any) -> None:
        """Change some `EndpointLimits` fields: `state.resize(max_concurrency=8)`."""
        self.reconfigure(dataclasses.replace(self.config, **changes))

    @property
    def concurrency(self) -> int | None:
        """The current (adaptive) concurrency limit; `None` when unlimited."""
        return None if self._limiter is None else int(self._limiter.total_tokens)

    @property
    def in_flight(self) -> int:
        return 0 if self._limiter is None else self._limiter.borrowed_tokens

    @property
    def requests_bucket(self) -> TokenBucket | None:
        return self._rpm

    @property
    def tokens_bucket(self) -> TokenBucket | None:
        return self._tpm

    # ------------------------------------------------------------------ admission
    async def acquire(self, tokens: int, *, output_tokens: int = 0) -> Permit:
        """Wait for the gate, a slot, a request and `tokens` tokens (`output_tokens` of them
        for output). Cancellation at any point gives back whatever was taken."""
        if self._tpm is not None and tokens > self._tpm.capacity:
            raise RequestTooLarge(
                f"this request needs about {tokens:,} tokens (prompt estimate + max_tokens) but the "
                f"tokens-per-minute limit for {self.model!r} at {self.endpoint} is "
                f"{self._tpm.capacity:,.0f}; send a smaller prompt or lower max_tokens"
            )
        permit = Permit()
        permit.output_tokens = output_tokens
        gate, clock = self.gate, self._clock
        # Only time spent queued counts as waiting: a call that finds its slot and tokens
        # there waits for nothing, though its one pass through the event loop (below) may
        # run a thousand other tasks first. Such a call emits no `limiter.wait`.
        waited = 0.0
        try:
            if gate.paused:  # checked first: most calls find it open, and skip a coroutine
                started = clock()
                await gate.wait()
                waited += clock() - started
            if self._limiter is not None:
                limiter = self._limiter
                try:
                    # A free slot and no one queued (`nowait` refuses while anyone waits):
                    # taken here, then one plain pass through the event loop, where anyio's
                    # `acquire` also builds a shielded cancel scope for it, once per call.
                    limiter.acquire_on_behalf_of_nowait(permit)
                except anyio.WouldBlock:
                    started = clock()
                    await limiter.acquire_on_behalf_of(permit)
                    waited += clock() - started
                    permit.limiter = limiter
                else:
                    permit.limiter = limiter  # given back below if cancelled at the checkpoint
                    await anyio.lowlevel.checkpoint()
            if self._rpm is not None:
                rpm = self._rpm
                waited += await rpm.acquire(1)
                permit.rpm, permit.requests = rpm, 1
            if self._tpm is not None:
                tpm = self._tpm
                try:
                    waited += await tpm.acquire(tokens)
                except ValueError:  # the bucket shrank below this request while it waited
                    raise RequestTooLarge(
                        f"this request needs about {tokens:,} tokens but the tokens-per-minute limit for "
                        f"{self.model!r} at {self.endpoint} is now {tpm.capacity:,.0f}"
                    ) from None
                permit.tpm, permit.tokens = tpm, tokens
            if gate.paused:  # a pause may have begun while we queued
                started = clock()
                await gate.wait()
                waited += clock() - started
        except BaseException:
            self._give_back(permit)
            raise
        permit.epoch = self._epoch
        permit.waited_s = waited
        if waited > 0:
            emit(
                LimiterWait,
                endpoint=self.endpoint,
                model=self.model,
                waited_s=waited,
                tokens=tokens,
                concurrency=self.concurrency,
            )
        return permit

    def _give_back(self, permit: Permit) -> None:
        if permit.limiter is not None:
            permit.limiter.release_on_behalf_of(permit)
            permit.limiter = None
        if not permit.sent:
            if permit.rpm is not None:
                permit.rpm.refund(permit.requests)
            if permit.tpm is not None:
                permit.tpm.refund(permit.tokens)
            permit.rpm = permit.tpm = None

    def release(
        self, permit: Permit, *, completion: Completion | None = None, error: BaseException | None = None
    ) -> None:
        """Give back the slot; refund what a request not sent, or not used, took; learn from
        the outcome (headers, 429 pause, concurrency up or down)."""
        sent = permit.sent
        self._give_back(permit)
        if not sent:
            return
        if completion is not None:
            usage = completion.usage
            if permit.tpm is not None and usage.total_tokens > 0:  # none reported: keep the estimate
                output = (
                    permit.output_tokens if self.config.tpm_charges_max_tokens else usage.completion_tokens
                )
                counted = usage.prompt_tokens + output
                if counted < permit.tokens:
                    permit.tpm.refund(permit.tokens - counted)
                else:
                    permit.tpm.charge(counted - permit.tokens)
            if completion.rate_limit is not None and self.config.learn_from_headers:
                self._learn(completion.rate_limit)
            self._on_success()
        elif isinstance(error, RetryableError):
            self._on_congestion(permit, error)

    # ------------------------------------------------------------------ adaptation
    def _on_success(self) -> None:
        if self._limiter is None or not self.config.adaptive:
            return
        ceiling = self.config.max_concurrency or 1
        current = int(self._limiter.total_tokens)
        if current >= ceiling:
            return
        self._successes += 1
        if self._successes >= current:
            self._successes = 0
            self._limiter.total_tokens = current + 1
            self.grows += 1
            emit(
                LimiterResize,
                endpoint=self.endpoint,
                model=self.model,
                concurrency=current + 1,
                reason="success",
            )

    def _on_congestion(self, permit: Permit, error: RetryableError) -> None:
        retry_after = error.retry_after
        if self.config.shared_pause and (isinstance(error, RateLimited) or retry_after is not None):
            seconds = self.config.pause_without_retry_after_s if retry_after is None else retry_after
            seconds = min(max(seconds, 0.0), self.retry_after_cap_s)
            if self.gate.pause(seconds):
                self.pauses += 1
                emit(
                    RateLimitPause,
                    endpoint=self.endpoint,
                    model=self.model,
                    seconds=seconds,
                    retry_after=retry_after,
                    status_code=error.status_code,
                )
        if self._limiter is None or not self.config.adaptive or permit.epoch != self._epoch:
            return
        self._epoch += 1
        self._successes = 0
        current = int(self._limiter.total_tokens)
        shrunk = max(self.config.min_concurrency, int(current * self.config.decrease_factor))
        if shrunk < current:
            self._limiter.total_tokens = shrunk
            self.shrinks += 1
            emit(
                LimiterResize,
                endpoint=self.endpoint,
                model=self.model,
                concurrency=shrunk,
                reason=type(error).__name__,
            )

    def _learn(self, info: RateLimitInfo) -> None:
        if info.limit_tokens is not None and info.limit_tokens > 0:
            if self._tpm is None:
                self._tpm = TokenBucket(info.limit_tokens, clock=self._clock, sleep=self._sleep)
            elif info.limit_tokens < self._tpm.capacity:
                self._tpm.resize(info.limit_tokens)
        if info.limit_requests is not None and info.limit_requests > 0:
            if self._rpm is None:
                self._rpm = TokenBucket(info.limit_requests, clock=self._clock, sleep=self._sleep)
            elif info.limit_requests < self._rpm.capacity:
                self._rpm.resize(info.limit_requests)
        if self._tpm is not None and info.remaining_tokens is not None:
            self._tpm.correct(info.remaining_tokens, info.reset_tokens_s)
        if self._rpm is not None and info.remaining_requests is not None:
            self._rpm.correct(info.remaining_requests, info.reset_requests_s)


class LimitRegistry:
    """One `LimitState` per (endpoint, model), per event loop (anyio primitives belong to the
    loop that made them; a second `asyncio.run` gets fresh state, same configuration)."""

    def __init__(
        self, default: EndpointLimits, *, clock: Clock, sleep: Sleep, retry_after_cap_s: float = 60.0
    ) -> None:
        self.default = default
        self._clock = clock
        self._sleep = sleep
        self._retry_after_cap_s = retry_after_cap_s
        self._configured: dict[tuple[str, str], EndpointLimits] = {}
        self._states: anyio.lowlevel.RunVar[dict[tuple[str, str], LimitState]] = anyio.lowlevel.RunVar(
            "rlm_async_governor_limits"
        )

    def get(self, endpoint: str, model: str, limits: EndpointLimits | None = None) -> LimitState:
        """The live state; `limits`, when given and new, reconfigures it."""
        key = (endpoint, model)
        # Compare with what was configured, not with the live state: a runtime `resize`
        # must survive callers that pass the same configuration on every call.
        configured = self._configured.get(key)
        # `is` first: callers pass the same configuration object on every call.
        changed = limits is not None and configured is not limits and configured != limits
        if changed:
            assert limits is not None
            self._configured[key] = limits
        states = self._states.get(None)
        if states is None:
            states = {}
            self._states.set(states)
        state = states.get(key)
        if state is None:
            state = states[key] = LimitState(
                endpoint,
                model,
                self._configured.get(key, self.default),
                clock=self._clock,
                sleep=self._sleep,
                retry_after_cap_s=self._retry_after_cap_s,
            )
        elif changed:
            assert limits is not None
            state.reconfigure(limits)
        return state
