"""A batch of prompts that holds their common prefix once.

Code fans out by putting the same instructions before each chunk. At 5,000 sub-calls of
2K-token chunks with 5 KB of instructions, that is 26 MB of one text held 5,000 times, and
held for as long as the calls are in flight: a call may be retried, so its prompt stays
until it ends, and at the peak of a wide fan-out nearly every call is in flight. The
control channel's reader finds the common prefix (`shared_prefix_bytes`) and keeps it
once, with each prompt's rest (`SharedPrefixPrompts`); the fan-out's requests carry them
as `PrefixedMessage`s.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

__all__ = ["SharedPrefixPrompts", "common_prefix_len", "prompt_chars", "shared_prefix_bytes"]

MIN_SHARED_BYTES = 256
"""A shorter common prefix (in UTF-8 bytes) is left in each prompt: the saving would not pay
for the joins."""


class SharedPrefixPrompts(Sequence[str]):
    """Prompts as one prefix and each prompt's rest. Indexing joins the two (a new `str`
    each time); slicing keeps the prefix shared."""

    __slots__ = ("prefix", "rests")

    def __init__(self, prefix: str, rests: Sequence[str]) -> None:
        self.prefix = prefix
        self.rests = rests

    def __len__(self) -> int:
        return len(self.rests)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> SharedPrefixPrompts: ...
    def __getitem__(self, index: int | slice) -> str | SharedPrefixPrompts:
        if isinstance(index, slice):
            return SharedPrefixPrompts(self.prefix, self.rests[index])
        return self.prefix + self.rests[index]

    def __iter__(self) -> Iterator[str]:
        prefix = self.prefix
        return (prefix + rest for rest in self.rests)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # as a list's: equal to sequences that are not hashable

    def __repr__(self) -> str:
        return f"SharedPrefixPrompts(prefix={self.prefix[:40]!r}... ({len(self.prefix):,} chars), {len(self):,} rests)"

    def chars(self) -> int:
        """Characters of all the prompts, as if joined."""
        return len(self.prefix) * len(self.rests) + sum(map(len, self.rests))


def shared_prefix_bytes(blob: bytes | bytearray, lengths: Sequence[int]) -> int:
    """Bytes that every prompt of `blob` (cut at `lengths`, UTF-8) starts with, cut back
    to a character boundary; 0 when under `MIN_SHARED_BYTES` or fewer than two prompts.
    Found on the bytes, before any prompt is decoded: each prompt is then decoded past the
    prefix, and no whole prompt is ever made (making them and cutting them afterwards left
    the heap in holes the size of the prefix, and the process as large as before).

    One C comparison per prompt (`startswith`); the prefix is narrowed, by bisection, only
    at a prompt that does not share all of it."""
    if len(lengths) < 2 or min(lengths) < MIN_SHARED_BYTES:
        return 0
    prefix = bytes(blob[: min(lengths)])
    start = 0
    for length in lengths:
        if not blob.startswith(prefix, start):
            good, bad = 0, len(prefix)  # bytes shared, known; not shared, known
            while bad - good > 1:
                mid = (good + bad) // 2
                if blob.startswith(prefix[:mid], start):
                    good = mid
                else:
                    bad = mid
            if good < MIN_SHARED_BYTES:
                return 0
            prefix = prefix[:good]
        start += length
    return _char_boundary(prefix)


def _char_boundary(data: bytes) -> int:
    """The longest start of `data` that ends no UTF-8 sequence part-way (invalid bytes are
    left for the strict decode to refuse)."""
    n = len(data)
    i = n - 1
    while i > n - 4 and i >= 0 and data[i] & 0xC0 == 0x80:  # continuation bytes: back to the lead
        i -= 1
    if i < 0:
        return n
    lead = data[i]
    size = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return i if i + size > n else n


def common_prefix_len(a: str, b: str) -> int:
    """Characters `a` and `b` start with in common. Of a set of strings, the common prefix
    is that of its lexicographic min and max."""
    # Binary search on slice equality: C-speed comparisons instead of a char-by-char loop.
    good, bad = 0, min(len(a), len(b)) + 1
    while bad - good > 1:
        mid = (good + bad) // 2
        if a[:mid] == b[:mid]:
            good = mid
        else:
            bad = mid
    return good


def prompt_chars(prompts: Sequence[str]) -> int:
    """Characters of `prompts`, without joining shared ones."""
    if isinstance(prompts, SharedPrefixPrompts):
        return prompts.chars()
    return sum(map(len, prompts))
