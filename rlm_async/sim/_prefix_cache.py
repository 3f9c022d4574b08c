"""Automatic prompt-prefix caching with OpenAI's semantics.

- Only prompts of at least `min_tokens` (1024) are cached, and a hit is the longest cached
  prefix that is a multiple of `step_tokens` (128): 1024, 1152, 1280, ... tokens.
- A request's prefixes become usable by later requests only when it finishes (or, if so
  configured, when its first token would have been sent). So N requests sent at the same
  moment with the same cold prefix all miss; one sent after the first finished hits.
- Hits are reported as `usage.prompt_tokens_details.cached_tokens` and skip prefill, so the
  latency model charges prefill only for uncached tokens.

How: the canonical serialization (see `_tokens`) is cut into blocks of `step_tokens * 4`
characters, and each block boundary gets a key for everything before it, so "the first k
blocks match" is one dict lookup. The key chains Python's own string hash (SipHash, keyed
per process): key(k) = hash((key(k - 1), hash(block k))), key(0) = hash(namespace). That
is about half the CPU of one running SHA-256 copied and digested at each boundary (its
per-block copies cost more than the hashing), which matters because the simulator hashes
every block of every request. The keys are 64-bit and live only in this process: with a
million entries a lookup meets a colliding key with odds of about 1 in 10^12, the only way
a cached-token count could differ from an exact comparison of prefixes. Entries idle
longer than `ttl_s` miss, and a sweep once per `ttl_s` evicts them. Pure bookkeeping: time
is passed in, nothing sleeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate, repeat

from ._config import CacheModel
from ._tokens import CHARS_PER_TOKEN

__all__ = ["PrefixCache", "PromptBlocks"]


@dataclass(frozen=True, slots=True)
class PromptBlocks:
    """The cacheable prefixes of one prompt: `digests[i]` covers the first
    `(first_block + i) * step_tokens` tokens."""

    digests: tuple[int, ...]
    first_block: int
    step_tokens: int

    def tokens_at(self, index: int) -> int:
        return (self.first_block + index) * self.step_tokens


_EMPTY = PromptBlocks((), 0, 0)


def _chain(key: int, block_hash: int) -> int:
    return hash((key, block_hash))


class PrefixCache:
    """The prefix cache of one simulated deployment (shared by every model it serves; the
    model name is part of the key, so models never share entries)."""

    def __init__(self, model: CacheModel) -> None:
        self.model = model
        self._block_chars = model.step_tokens * CHARS_PER_TOKEN
        self._first_block = -(-model.min_tokens // model.step_tokens)
        self._last_used: dict[int, float] = {}
        self._swept_at: float | None = None

    def __len__(self) -> int:
        return len(self._last_used)

    def blocks(self, namespace: str, prompt_text: str) -> PromptBlocks:
        """Digest the cacheable prefixes of `prompt_text` (the canonical serialization).
        `namespace` keeps models (and, if configured, cache keys) apart."""
        if not self.model.enabled:
            return _EMPTY
        full_blocks = len(prompt_text) // self._block_chars
        if full_blocks < self._first_block:
            return _EMPTY
        size = self._block_chars
        block_hashes = map(hash, [prompt_text[i : i + size] for i in range(0, full_blocks * size, size)])
        keys = tuple(accumulate(block_hashes, _chain, initial=hash(namespace)))
        return PromptBlocks(keys[self._first_block :], self._first_block, self.model.step_tokens)

    def lookup(self, blocks: PromptBlocks, now: float) -> int:
        """Cached tokens for this prompt at time `now` (0 on a miss); refreshes what it hit."""
        ttl = self.model.ttl_s
        hit = -1
        for i, digest in enumerate(blocks.digests):
            used = self._last_used.get(digest)
            if used is None or (ttl is not None and now - used > ttl):
                break
            hit = i
        if hit < 0:
            return 0
        self._last_used.update(zip(blocks.digests[: hit + 1], repeat(now)))
        return blocks.tokens_at(hit)

    def insert(self, blocks: PromptBlocks, now: float) -> None:
        """Make every cacheable prefix of this prompt usable from `now` on."""
        self._last_used.update(zip(blocks.digests, repeat(now)))
        # Expired entries already miss (`lookup` checks their age); sweeping them only frees
        # memory, so once per `ttl_s` is enough, and an entry lives at most twice its ttl.
        # (A sweep every 256 inserts rescanned the whole dict a few times a second in a
        # 5,000-way fan-out, for nothing: no entry was older than a second.)
        ttl = self.model.ttl_s
        if ttl is not None:
            if self._swept_at is None:
                self._swept_at = now
            elif now - self._swept_at > ttl:
                self._sweep(now)
                self._swept_at = now

    def clear(self) -> None:
        self._last_used.clear()
        self._swept_at = None

    def _sweep(self, now: float) -> None:
        ttl = self.model.ttl_s
        assert ttl is not None
        expired = [d for d, used in self._last_used.items() if now - used > ttl]
        for d in expired:
            del self._last_used[d]
