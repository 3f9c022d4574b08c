"""Plain data shared by every layer: messages, requests, completions, usage, call records.

Everything here is a frozen, slotted dataclass with no behaviour beyond arithmetic and
conversion to JSON-ready dicts. Nothing here imports from the rest of the package.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]

CallKind = Literal["root", "sub", "child", "final"]
"""What a model call is for: a root turn of an RLM loop, a plain sub-call (`llm_query`),
the root turn of a child RLM (`rlm_query` below `max_depth`), or the last "give your final
answer" call made when iterations or budget run out."""

CallStatus = Literal["ok", "error", "budget", "cancelled"]


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}

    def chars(self) -> int:
        """Characters of content (without joining a `PrefixedMessage`'s)."""
        return len(self.content)

    def head(self, n: int) -> str:
        """The first `n` characters of content (without joining a `PrefixedMessage`'s)."""
        return self.content[:n]


class PrefixedMessage(Message):
    """A message whose content is a prefix shared with other messages and a rest of its own,
    joined on each read of `content`. A fan-out's sub-call prompts usually repeat the same
    instructions before each chunk: its requests hold them once (`SharedPrefixPrompts`),
    for as long as the calls are in flight, and a whole prompt exists only while something
    reads it (the request body as it is written, a journal key, a token count).

    It is a `Message` to every reader: `content` is a `str`, equality and hash are those of
    a `Message` with the same role and content, and it pickles as one."""

    __slots__ = ("prefix", "rest")
    prefix: str
    rest: str

    def __init__(self, role: Role, prefix: str, rest: str) -> None:
        object.__setattr__(self, "role", role)
        object.__setattr__(self, "prefix", prefix)
        object.__setattr__(self, "rest", rest)

    @property
    def content(self) -> str:
        return self.prefix + self.rest

    def chars(self) -> int:
        return len(self.prefix) + len(self.rest)

    def head(self, n: int) -> str:
        prefix = self.prefix
        return prefix[:n] if len(prefix) >= n else prefix + self.rest[: n - len(prefix)]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self.role == other.role and self.content == other.content

    def __hash__(self) -> int:
        return hash((self.role, self.content))

    def __reduce__(self) -> tuple[type[Message], tuple[Role, str]]:
        return Message, (self.role, self.content)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRequest:
    """One chat-completion request, exactly as it will go on the wire."""

    model: str
    messages: tuple[Message, ...]
    max_tokens: int | None = None
    """Output cap sent to the server; also what budgets and TPM meters reserve for output."""
    temperature: float | None = None
    prompt_cache_key: str | None = None
    """OpenAI's routing hint for prefix caching; `None` sends nothing."""
    sampling: Mapping[str, Any] | None = field(default=None, hash=False)
    """More body fields sent as they are (`ModelConfig.sampling`); part of the journal key."""

    def prompt_chars(self) -> int:
        return sum(m.chars() for m in self.messages)


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens, dollars and calls: what one response reported, or the sum over any set of
    calls (a query, a model, a depth, a ledger, a trace). The one usage type: every layer
    that counts adds `Usage`s together with `+` and reads these names, the OpenAI wire's.

    A response's usage (`Completion.usage`, `CallRecord.usage`) carries tokens only; what a
    call adds to totals, its status counted, is `Usage.of_call(...)`. `cached_tokens` is a
    subset of `prompt_tokens`. Dollars are a float here, a sum for reports; where a cap is
    enforced the ledger pairs a `Usage` with exact `Decimal` dollars (`_governor.Charge`)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    _: KW_ONLY
    cost_usd: float = 0.0
    calls: int = 0
    """Calls sent (each retry attempt counted by the ledger; journal hits counted by totals
    of call records); budget refusals are not calls."""
    failed_calls: int = 0
    """Of `calls`, those whose status is not "ok" (error, cancelled, unfinished)."""
    refused_calls: int = 0
    """Calls the budget refused before sending: not in `calls`."""
    journal_hits: int = 0
    """Of `calls`, those answered from the response journal (no tokens, no dollars)."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def uncached_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def cache_hit_ratio(self) -> float | None:
        """cached / prompt tokens; `None` when no prompt tokens were reported (no call, or
        only journal hits), so "nothing to measure" never reads as "every prompt missed"."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None

    def __add__(self, other: Usage) -> Usage:
        return _usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cached_tokens + other.cached_tokens,
            self.cost_usd + other.cost_usd,
            self.calls + other.calls,
            self.failed_calls + other.failed_calls,
            self.refused_calls + other.refused_calls,
            self.journal_hits + other.journal_hits,
        )

    def __sub__(self, other: Usage) -> Usage:
        return _usage(
            self.prompt_tokens - other.prompt_tokens,
            self.completion_tokens - other.completion_tokens,
            self.cached_tokens - other.cached_tokens,
            self.cost_usd - other.cost_usd,
            self.calls - other.calls,
            self.failed_calls - other.failed_calls,
            self.refused_calls - other.refused_calls,
            self.journal_hits - other.journal_hits,
        )

    def __neg__(self) -> Usage:
        return _usage(
            -self.prompt_tokens,
            -self.completion_tokens,
            -self.cached_tokens,
            -self.cost_usd,
            -self.calls,
            -self.failed_calls,
            -self.refused_calls,
            -self.journal_hits,
        )

    @classmethod
    def of_call(
        cls, status: str, tokens: Usage, *, cost_usd: float = 0.0, from_journal: bool = False
    ) -> Usage:
        """What one finished call adds to totals: a budget refusal counts apart (nothing was
        sent); any other status is a call, failed unless "ok", with its tokens and dollars."""
        if status == "budget":
            return cls(refused_calls=1)
        return cls(
            tokens.prompt_tokens,
            tokens.completion_tokens,
            tokens.cached_tokens,
            cost_usd=cost_usd,
            calls=1,
            failed_calls=int(status != "ok"),
            journal_hits=int(from_journal),
        )

    def to_dict(self) -> dict[str, Any]:
        ratio = self.cache_hit_ratio
        return {
            "calls": self.calls,
            "failed_calls": self.failed_calls,
            "refused_calls": self.refused_calls,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cost_usd": round(self.cost_usd, 8),
            "journal_hits": self.journal_hits,
            "cache_hit_ratio": None if ratio is None else round(ratio, 4),
        }


# A ledger adds and subtracts Usages several times per model call. A frozen dataclass's
# `__init__` sets each field with `object.__setattr__`; setting each slot through its
# descriptor, bound once, takes about half the time (as `_events._fast_constructor` does).
_new_usage = object.__new__
(
    _set_prompt,
    _set_completion,
    _set_cached,
    _set_cost,
    _set_calls,
    _set_failed,
    _set_refused,
    _set_hits,
) = (
    getattr(Usage, name).__set__
    for name in (
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "cost_usd",
        "calls",
        "failed_calls",
        "refused_calls",
        "journal_hits",
    )
)


def _usage(
    prompt: int, completion: int, cached: int, cost: float, calls: int, failed: int, refused: int, hits: int
) -> Usage:
    """`Usage(prompt, completion, cached, cost_usd=cost, calls=calls, ...)`, every field given."""
    usage: Usage = _new_usage(Usage)
    _set_prompt(usage, prompt)
    _set_completion(usage, completion)
    _set_cached(usage, cached)
    _set_cost(usage, cost)
    _set_calls(usage, calls)
    _set_failed(usage, failed)
    _set_refused(usage, refused)
    _set_hits(usage, hits)
    return usage


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitInfo:
    """What the server said about its limits in `x-ratelimit-*` headers; `None` where unsent."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Completion:
    """A successful response, reduced to what the engine uses."""

    text: str
    usage: Usage
    model: str
    finish_reason: str | None = None
    rate_limit: RateLimitInfo | None = None
    usage_reported: bool = True
    """False when the server sent no usage (or no prompt tokens): `usage` is then not the
    truth, and the governor charges the call's reservation instead."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HedgeSummary:
    """What hedging did for one logical call (see `HedgeConfig`): copies beyond the first."""

    sent: int = 0
    """Hedge copies sent (the original not counted)."""
    won: bool = False
    """A hedge copy's answer was the one returned."""
    cancelled: int = 0
    """Copies (the original included) cancelled because another answered first."""
    failed: int = 0
    """Copies that failed on their own (errors; budget refusals are `refused`)."""
    refused: int = 0
    """Hedges the budget refused before sending: no reservation, no hedge."""
    extra: Usage = field(default_factory=Usage)
    """What the copies whose answer was not used cost (tokens billed, dollars in `cost_usd`)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "won": self.won,
            "cancelled": self.cancelled,
            "failed": self.failed,
            "refused": self.refused,
            "extra": self.extra.to_dict(),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class CallRecord:
    """One model call as the call tree saw it, successful or not. Times are on the engine clock."""

    call_id: str
    node_id: str
    parent_id: str | None
    depth: int
    kind: CallKind
    model: str
    started_at: float
    finished_at: float
    status: CallStatus
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    attempts: int = 1
    from_journal: bool = False
    error: str | None = None
    hedge: HedgeSummary | None = None
    """Set when hedge copies were sent for this call; `usage` and `cost_usd` include them."""
    usage_estimated: bool = False
    """The server reported no usage: `usage` and `cost_usd` are the reservation, an upper bound."""

    @property
    def latency_s(self) -> float:
        return self.finished_at - self.started_at

    @property
    def totals(self) -> Usage:
        """What this call adds to totals: tokens, dollars, and how it counts (`Usage.of_call`)."""
        return Usage.of_call(self.status, self.usage, cost_usd=self.cost_usd, from_journal=self.from_journal)

    def to_dict(self) -> dict[str, Any]:
        return {
            "call_id": self.call_id,
            "node_id": self.node_id,
            "parent_id": self.parent_id,
            "depth": self.depth,
            "kind": self.kind,
            "model": self.model,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "status": self.status,
            "usage": self.totals.to_dict(),
            "cost_usd": self.cost_usd,
            "attempts": self.attempts,
            "from_journal": self.from_journal,
            "error": self.error,
            **({"hedge": self.hedge.to_dict()} if self.hedge is not None else {}),
            "usage_estimated": self.usage_estimated,
        }
