"""Token estimators: the UTF-8 byte bound used for budgets, the chars-per-token mode, and
that the chars-per-token mode bounds the simulator's documented tokenizer."""

from __future__ import annotations

import random

import pytest

from rlm_async._governor import CharsPerTokenEstimator, Utf8BytesEstimator
from rlm_async._types import Message, ModelRequest
from rlm_async.exceptions import ConfigError


def request(*contents: str, role: str = "user") -> ModelRequest:
    return ModelRequest(model="m", messages=tuple(Message(role, c) for c in contents))  # type: ignore[arg-type]


class TestUtf8Bytes:
    def test_counts_bytes_plus_allowances(self) -> None:
        """ASCII counts one per character; other text counts its UTF-8 bytes; each message
        and the request add their template allowances."""
        est = Utf8BytesEstimator(per_message_tokens=8, per_request_tokens=128)
        assert est.prompt_tokens(request("hello")) == 5 + 8 + 128
        assert est.prompt_tokens(request("é", "日本", "🙂")) == (2 + 8) + (6 + 8) + (4 + 8) + 128

    def test_negative_allowance_is_refused(self) -> None:
        """Allowances below zero are a ConfigError naming them."""
        with pytest.raises(ConfigError, match="per_message_tokens=-1"):
            Utf8BytesEstimator(per_message_tokens=-1)


class TestCharsPerToken:
    def test_rounds_up_per_message(self) -> None:
        """Each message's characters are divided and rounded up, then allowances added."""
        est = CharsPerTokenEstimator(chars_per_token=4, per_message_tokens=2, per_request_tokens=3)
        assert est.prompt_tokens(request("abcde", "abcd")) == (2 + 2) + (1 + 2) + 3

    def test_zero_is_refused(self) -> None:
        """chars_per_token must be positive."""
        with pytest.raises(ConfigError, match="chars_per_token must be > 0, got 0"):
            CharsPerTokenEstimator(chars_per_token=0)

    def test_bounds_the_simulator_tokenizer(self) -> None:
        """`chars_per_token=4` (GovernorConfig(chars_per_token=4)) never reserves less than
        the simulator reports, for any roles and contents."""
        sim_tokens = pytest.importorskip("rlm_async.sim._tokens")
        est = CharsPerTokenEstimator(chars_per_token=4)
        rng = random.Random(11)
        for _ in range(500):
            messages = tuple(
                Message(rng.choice(["system", "user", "assistant"]), "x" * rng.randint(0, 40))
                for _ in range(rng.randint(1, 6))
            )
            r = ModelRequest(model="sim-sub", messages=messages)
            assert sim_tokens.prompt_tokens(messages) <= est.prompt_tokens(r)
