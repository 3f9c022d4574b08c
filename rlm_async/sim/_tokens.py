"""The simulator's tokenizer: four characters of a canonical serialization make one token.

Real tokenizers are not available offline (tiktoken ships no BPE files), and the simulator
needs one that a client can reproduce exactly, so budgets, TPM meters and cache planners can
be tested against numbers they can predict:

    serialization = "".join(f"<|{role}|>{content}<|end|>" for each message) + "<|assistant|>"
    prompt_tokens = ceil(len(serialization) / 4)
    completion_tokens = ceil(len(reply) / 4)

Lengths are in Python characters (code points), not bytes. A prompt prefix of `k * 512`
characters is exactly `k * 128` tokens, which is how the prefix cache cuts 128-token blocks.
This is not a real tokenizer and makes no claim to match any provider's counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["CHARS_PER_TOKEN", "count_tokens", "prompt_tokens", "serialize_messages"]

CHARS_PER_TOKEN = 4


def serialize_messages(messages: Iterable[Any]) -> str:
    """The canonical prompt text for `messages`: `Message` objects, or mappings with
    "role" and "content" (the JSON of a chat-completion request)."""
    parts: list[str] = []
    for m in messages:
        if isinstance(m, Mapping):
            role, content = m.get("role", ""), m.get("content", "")
        else:
            role, content = m.role, m.content
        parts.append(f"<|{role}|>{content}<|end|>")
    parts.append("<|assistant|>")
    return "".join(parts)


def count_tokens(text: str) -> int:
    """Tokens in `text`: ceil(characters / 4); 0 for the empty string."""
    return -(-len(text) // CHARS_PER_TOKEN)


def prompt_tokens(messages: Iterable[Any]) -> int:
    """Prompt tokens the simulator will report for these messages."""
    return count_tokens(serialize_messages(messages))
