"""Plain data shared by every layer: messages, requests, completions, usage, call records.

Everything here is a frozen, slotted dataclass with no behaviour beyond arithmetic and
conversion to JSON-ready dicts. Nothing here imports from the rest of the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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

    def prompt_chars(self) -> int:
        return sum(len(m.content) for m in self.messages)


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens as the server reported them. `cached_tokens` is a subset of `prompt_tokens`."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def uncached_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cached_tokens + other.cached_tokens,
        )

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "total_tokens": self.total_tokens,
        }


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

    @property
    def latency_s(self) -> float:
        return self.finished_at - self.started_at

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
            "usage": self.usage.to_dict(),
            "cost_usd": self.cost_usd,
            "attempts": self.attempts,
            "from_journal": self.from_journal,
            "error": self.error,
        }
