"""RPM/TPM limits as OpenAI applies them, and the headers it sends about them.

Each limit is a bucket of `limit` units that refills continuously at `limit / 60` units a
second (OpenAI's limits behave this way: a 60 RPM key gets about one request a second, not
60 at the top of each minute). A request needs 1 request unit and `prompt + max_tokens`
token units; if either bucket is short, it is refused with 429 and told when it would fit.

Every response carries `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for the
limits that are configured, with resets as Go durations ("12ms", "1.5s", "6m0s") — the
time until that bucket is full again. A refusal adds `retry-after` (whole seconds, rounded
up) and `retry-after-ms`. Pure bookkeeping: time is passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._config import RateLimits

__all__ = ["Admission", "RateLimiter", "go_duration"]


def go_duration(seconds: float) -> str:
    """Format like Go's `time.Duration.String()`, to the millisecond: "0s", "12ms", "1.5s",
    "6m0s", "1h2m3s"."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class _Bucket:
    __slots__ = ("capacity", "level", "rate", "updated")

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity = capacity
        self.level = float(capacity)
        self.rate = capacity / 60.0
        self.updated = now

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait_for(self, amount: float) -> float:
        return max(0.0, (amount - self.level) / self.rate)

    def reset_s(self) -> float:
        return (self.capacity - self.level) / self.rate


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: bool
    headers: dict[str, str]
    """`x-ratelimit-*` (always) and, on refusal, `retry-after` / `retry-after-ms`."""
    retry_after_s: float | None = None
    limit_type: str | None = None
    """On refusal: "requests" or "tokens" (OpenAI's error `type`)."""
    message: str | None = None


class RateLimiter:
    """One deployment's RPM/TPM buckets (shared by every model it serves)."""

    def __init__(self, limits: RateLimits, now: float) -> None:
        self.limits = limits
        self._requests = _Bucket(limits.rpm, now) if limits.rpm is not None else None
        self._tokens = _Bucket(limits.tpm, now) if limits.tpm is not None else None

    @property
    def active(self) -> bool:
        return self._requests is not None or self._tokens is not None

    def admit(self, tokens: int, now: float, model: str = "sim-model") -> Admission:
        """Take 1 request and `tokens` tokens, or refuse and say when they would fit."""
        req, tok = self._requests, self._tokens
        for bucket in (req, tok):
            if bucket is not None:
                bucket.refill(now)
        if tok is not None and tokens > tok.capacity:
            message = (
                f"Request too large for {model} on tokens per min (TPM): Limit {tok.capacity}, "
                f"Requested {tokens}. The input or output tokens must be reduced in order to run "
                "successfully."
            )
            return Admission(False, self.headers(), None, "tokens", message)
        wait_req = req.wait_for(1) if req is not None else 0.0
        wait_tok = tok.wait_for(tokens) if tok is not None else 0.0
        if wait_req > 0 or wait_tok > 0:
            wait = max(wait_req, wait_tok)
            kind = "requests" if wait_req >= wait_tok else "tokens"
            bucket = req if kind == "requests" else tok
            assert bucket is not None
            per = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
            used = bucket.capacity - int(bucket.level)
            asked = 1 if kind == "requests" else tokens
            message = (
                f"Rate limit reached for {model} on {per}: Limit {bucket.capacity}, Used {used}, "
                f"Requested {asked}. Please try again in {go_duration(wait)}."
            )
            headers = self.headers()
            headers["retry-after"] = str(max(1, math.ceil(wait)))
            headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
            return Admission(False, headers, wait, kind, message)
        if req is not None:
            req.level -= 1
        if tok is not None:
            tok.level -= tokens
        return Admission(True, self.headers())

    def headers(self) -> dict[str, str]:
        """The `x-ratelimit-*` headers for the buckets as they stand (after the last refill)."""
        out: dict[str, str] = {}
        for name, bucket in (("requests", self._requests), ("tokens", self._tokens)):
            if bucket is None:
                continue
            out[f"x-ratelimit-limit-{name}"] = str(bucket.capacity)
            out[f"x-ratelimit-remaining-{name}"] = str(max(0, int(bucket.level)))
            out[f"x-ratelimit-reset-{name}"] = go_duration(bucket.reset_s())
        return out
