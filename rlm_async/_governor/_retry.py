"""The one retry layer: tenacity, with an explicit retry condition.

Retried: `RetryableError` (408/409/429/5xx, timeouts, dropped connections, malformed
bodies). Never retried: `FatalError` (400/401/403/404, context length, a request larger than
the TPM limit), `BudgetExceeded`, cancellation, bugs. tenacity retries every exception unless
told otherwise, hence `retry_if_exception_type(RetryableError)`; the SDK's own retries are
off in the transport.

Waits: after failed attempt n, equal jitter on a capped exponential,
`uniform(b/2, b)` with `b = min(cap_s, base_s * 2**(n-1))`, so concurrent failures spread
out but still back off. When the server named a `retry-after`, it is honoured up to
`retry_after_cap_s`, plus `uniform(0, base_s)` so the retries do not land together.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import tenacity

from ..exceptions import ConfigError, RetryableError
from ._clock import Sleep

__all__ = ["RetryConfig", "backoff_s", "make_retrying"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryConfig:
    """How the governor retries a failed model call."""

    max_attempts: int = 5
    """Attempts in all, the first included; 1 turns retrying off."""
    base_s: float = 0.5
    """Backoff after the first failure (before jitter); doubles each attempt."""
    cap_s: float = 30.0
    """Largest exponential backoff."""
    retry_after_cap_s: float = 60.0
    """Largest `retry-after` honoured (and longest 429 pause); a server asking for more is
    asked again after this long."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"RetryConfig.max_attempts is {self.max_attempts}; use >= 1 (1 = no retries)")
        for name in ("base_s", "cap_s", "retry_after_cap_s"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"RetryConfig.{name} is {getattr(self, name)}; use a number >= 0")


def backoff_s(config: RetryConfig, attempt: int, error: BaseException | None, rng: random.Random) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based)."""
    exp = min(config.cap_s, config.base_s * 2.0 ** min(attempt - 1, 64))
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        return min(max(float(retry_after), 0.0), config.retry_after_cap_s) + rng.uniform(0.0, config.base_s)
    return rng.uniform(exp / 2.0, exp)


def make_retrying(
    config: RetryConfig,
    *,
    sleep: Sleep,
    rng: random.Random,
    before_sleep: Callable[[tenacity.RetryCallState], None] | None = None,
) -> tenacity.AsyncRetrying:
    def wait(state: tenacity.RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        return backoff_s(config, state.attempt_number, error, rng)

    return tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(config.max_attempts),
        retry=tenacity.retry_if_exception_type(RetryableError),
        wait=wait,
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,  # the caller sees the last RetryableError itself, not tenacity's RetryError
    )
