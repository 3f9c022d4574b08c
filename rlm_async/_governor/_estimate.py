"""Prompt token estimates made before a call, without the server's tokenizer.

Two uses, two needs:

* **Budgets** need an *upper bound*: a reservation smaller than what the server will
  report lets committed spend cross a cap. `Utf8BytesEstimator` (the default) is one.
* **Rate meters** (tokens/minute) need a *fair guess* close to what the server's limiter
  counts; over-estimating there only wastes throughput. `CharsPerTokenEstimator(4)` is the
  usual rule of thumb for English under OpenAI's tokenizers.

Why UTF-8 bytes bound a BPE tokenizer from above
------------------------------------------------
A byte-level BPE (GPT-2, tiktoken's cl100k/o200k, Llama 3, Qwen, Mistral's Tekken) splits the
UTF-8 bytes of the text into tokens that each cover at least one byte: merges only ever
join bytes. So `tokens(text) <= len(text.encode("utf-8"))`. A SentencePiece BPE with byte
fallback (Llama 2, Gemma, Mistral v1-v3) covers at least one character per token and spells
an unknown character as its UTF-8 bytes, one token each; a character is at least one byte,
so the same bound holds, plus one "dummy prefix" token per piece of text, which the
per-message allowance absorbs.

What the bound assumes (the budget fuzz test drives the ledger with usage inside this bound;
tests/test_budget_estimate.py checks `chars_per_token=4` against the simulator's rule):

1. The tokenizer is one of the two kinds above and applies no normalisation that makes the
   text longer (NFKC can turn one 3-byte character into four; no chat model we know of
   normalises that way).
2. The chat template adds at most `per_message_tokens` per message (role header, separators,
   end-of-turn: 3 to 5 tokens in the OpenAI, ChatML, Llama 3, Gemma and harmony templates)
   and at most `per_request_tokens` per request (BOS, the assistant header that primes the
   reply, and a default system prompt some templates inject: gpt-oss's harmony header and
   Llama 3.1's date lines are the largest we know, under 100 tokens).
3. Output is bounded by `max_tokens`, which the governor always sends (it fills in
   `GovernorConfig.default_max_tokens` when a request has none).

If a server breaks an assumption, the ledger records the truth and logs the overrun; a cap
can then be crossed by at most that call's excess. For a server whose tokenizer is known,
`CharsPerTokenEstimator` with its documented characters-per-token floor is tighter.

What it is not: a tokenizer. English prose is about 4 bytes a token, so the byte bound
reserves about four times what a call will use; reservations are refunded at settlement.
A loose bound is safe but costs throughput: a fan-out's prompts reserve at once, and those
that do not fit are refused, so a cap of 1M tokens over 50 KB prompts admits about a
quarter of what it could (benchmarks/budget.py measures the reservation-to-actual ratio).

Tighter, where the tokenizer is known (the byte bound stays the default fallback):

* `CharsPerTokenEstimator`: a documented characters-per-token floor (the simulator's 4,
  `GovernorConfig(chars_per_token=4)`).
* `TokenizerEstimator`: any tokenizer's count function (a model's BPE loaded with
  tiktoken from a local file, a server's tokenize endpoint wrapped in a cache), plus the
  same template allowances: `Governor(estimator=TokenizerEstimator(count_tokens=fn))`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .._types import Message, ModelRequest, PrefixedMessage
from ..exceptions import ConfigError

__all__ = ["CharsPerTokenEstimator", "TokenEstimator", "TokenizerEstimator", "Utf8BytesEstimator"]


@runtime_checkable
class TokenEstimator(Protocol):
    """Estimates the prompt tokens of a request before it is sent."""

    def prompt_tokens(self, request: ModelRequest) -> int: ...


def _utf8_len(text: str) -> int:
    # `isascii` is O(1) in CPython (a flag on the string), so the common case costs nothing.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _message_utf8_len(message: Message) -> int:
    """A message's UTF-8 bytes; a `PrefixedMessage`'s without joining its two parts."""
    if isinstance(message, PrefixedMessage):
        return _utf8_len(message.prefix) + _utf8_len(message.rest)
    return _utf8_len(message.content)


@dataclass(frozen=True, slots=True, kw_only=True)
class Utf8BytesEstimator:
    """Upper bound for byte-level and byte-fallback BPE tokenizers: UTF-8 bytes, plus a
    chat-template allowance. The default budget estimator; see the module docstring."""

    per_message_tokens: int = 8
    """Allowance per message for the template's role header and end-of-turn tokens."""
    per_request_tokens: int = 128
    """Allowance per request for BOS, the assistant header, and a default system prompt the
    template may inject."""

    def __post_init__(self) -> None:
        if self.per_message_tokens < 0 or self.per_request_tokens < 0:
            raise ConfigError(
                f"token allowances must be >= 0, got per_message_tokens={self.per_message_tokens}, "
                f"per_request_tokens={self.per_request_tokens}"
            )

    def prompt_tokens(self, request: ModelRequest) -> int:
        body = sum(_message_utf8_len(m) + self.per_message_tokens for m in request.messages)
        return body + self.per_request_tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenizerEstimator:
    """The prompt tokens of a known tokenizer, plus the chat template's allowances: the
    tightest bound, for when the server's tokenizer (or an exact count) is at hand.

    `count_tokens` must be synchronous and fast (it runs before every call, on the event
    loop); it is called once per message. A tokenizer that undercounts makes the ledger
    record an overrun (logged) rather than an error."""

    count_tokens: Callable[[str], int]
    """Tokens in one message's text, e.g. `lambda s: len(encoding.encode(s))`."""
    per_message_tokens: int = 8
    """Allowance per message for the template's role header and end-of-turn tokens."""
    per_request_tokens: int = 16
    """Allowance per request for BOS and the assistant header."""

    def __post_init__(self) -> None:
        if self.per_message_tokens < 0 or self.per_request_tokens < 0:
            raise ConfigError(
                f"token allowances must be >= 0, got per_message_tokens={self.per_message_tokens}, "
                f"per_request_tokens={self.per_request_tokens}"
            )

    def prompt_tokens(self, request: ModelRequest) -> int:
        count = self.count_tokens
        body = sum(count(m.content) + self.per_message_tokens for m in request.messages)
        return body + self.per_request_tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class CharsPerTokenEstimator:
    """`ceil(characters / chars_per_token)` per message, plus template allowances.

    An upper bound only when `chars_per_token` is a floor of the server's tokenizer: a
    simulator whose rule is known, or a fair guess for rate meters (4 for English)."""

    chars_per_token: float
    """Characters per token; smaller is more conservative. Must be > 0."""
    per_message_tokens: int = 8
    """Allowance per message for the template's role header and end-of-turn tokens."""
    per_request_tokens: int = 16
    """Allowance per request for BOS and the assistant header."""

    def __post_init__(self) -> None:
        if not self.chars_per_token > 0:
            raise ConfigError(f"chars_per_token must be > 0, got {self.chars_per_token}")
        if self.per_message_tokens < 0 or self.per_request_tokens < 0:
            raise ConfigError(
                f"token allowances must be >= 0, got per_message_tokens={self.per_message_tokens}, "
                f"per_request_tokens={self.per_request_tokens}"
            )

    def prompt_tokens(self, request: ModelRequest) -> int:
        per = self.chars_per_token
        body = sum(math.ceil(m.chars() / per) + self.per_message_tokens for m in request.messages)
        return body + self.per_request_tokens
