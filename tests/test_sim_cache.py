"""Prefix caching with OpenAI's semantics: the bookkeeping alone, then as a client sees it."""

from __future__ import annotations

import hashlib
from random import Random

import anyio
import pytest

from rlm_async._types import Completion, Message, ModelRequest
from rlm_async.sim import CacheModel, KindLatency, LatencyModel, PrefixCache, SimConfig, SimServer
from rlm_async.transport import OpenAITransport

pytestmark = pytest.mark.anyio

BLOCK = 512  # characters in one 128-token block


def text_of(tokens: int, tail: str = "") -> str:
    """A serialization of exactly `tokens` tokens (before `tail`)."""
    return ("abcd" * tokens)[: tokens * 4] + tail


class TestPrefixCacheBookkeeping:
    def test_prompts_under_1024_tokens_are_never_cached(self) -> None:
        """A 1023-token prompt misses even when the identical prompt was inserted before."""
        cache = PrefixCache(CacheModel())
        blocks = cache.blocks("m", text_of(1023))
        cache.insert(blocks, now=0.0)
        assert cache.lookup(blocks, now=1.0) == 0
        assert len(cache) == 0

    def test_hits_are_the_longest_shared_prefix_in_128_token_steps(self) -> None:
        """A prompt sharing 1500 tokens with a cached one gets 1408 cached tokens (11 x 128)."""
        cache = PrefixCache(CacheModel())
        cache.insert(cache.blocks("m", text_of(1500, "x" * 4000)), now=0.0)
        assert cache.lookup(cache.blocks("m", text_of(1500, "y" * 4000)), now=1.0) == 1408
        assert cache.lookup(cache.blocks("m", text_of(1100, "y" * 4000)), now=1.0) == 1024
        assert cache.lookup(cache.blocks("m", text_of(1000, "y" * 4000)), now=1.0) == 0

    def test_an_identical_prompt_hits_all_its_full_blocks(self) -> None:
        """Resending a 1300-token prompt reports 1280 cached tokens: the last partial block is not cached."""
        cache = PrefixCache(CacheModel())
        blocks = cache.blocks("m", text_of(1300))
        assert cache.lookup(blocks, now=0.0) == 0
        cache.insert(blocks, now=0.0)
        assert cache.lookup(blocks, now=0.5) == 1280

    def test_models_do_not_share_entries(self) -> None:
        """The same prompt cached for one model is a miss for another."""
        cache = PrefixCache(CacheModel())
        cache.insert(cache.blocks("model-a", text_of(2048)), now=0.0)
        assert cache.lookup(cache.blocks("model-b", text_of(2048)), now=0.0) == 0

    def test_idle_entries_expire_after_ttl_and_hits_refresh_them(self) -> None:
        """An entry unused for longer than ttl_s misses; each hit restarts its idle clock."""
        cache = PrefixCache(CacheModel(ttl_s=10.0))
        blocks = cache.blocks("m", text_of(2048))
        cache.insert(blocks, now=0.0)
        assert cache.lookup(blocks, now=9.0) == 2048
        assert cache.lookup(blocks, now=18.0) == 2048  # 9 s after the refresh at t=9
        assert cache.lookup(blocks, now=28.5) == 0

    def test_disabled_cache_never_hits(self) -> None:
        """With enabled=False nothing is cached."""
        cache = PrefixCache(CacheModel(enabled=False))
        blocks = cache.blocks("m", text_of(4096))
        cache.insert(blocks, now=0.0)
        assert cache.lookup(blocks, now=0.0) == 0


class _Sha256PrefixCache:
    """The cache as it was before its keys became chained string hashes: one running
    SHA-256 over the blocks, digested at each boundary. The reference for the test below."""

    def __init__(self, model: CacheModel) -> None:
        self.model = model
        self.first = -(-model.min_tokens // model.step_tokens)
        self.used: dict[bytes, float] = {}

    def blocks(self, namespace: str, text: str) -> list[bytes]:
        size, full = self.model.step_tokens * 4, len(text) // (self.model.step_tokens * 4)
        if full < self.first:
            return []
        h = hashlib.sha256(namespace.encode("utf-8", "surrogatepass") + b"\x00")
        out: list[bytes] = []
        for k in range(full):
            h.update(text[k * size : (k + 1) * size].encode("utf-8", "surrogatepass"))
            if k + 1 >= self.first:
                out.append(h.copy().digest())
        return out

    def lookup(self, digests: list[bytes], now: float) -> int:
        ttl, hit = self.model.ttl_s, -1
        for i, d in enumerate(digests):
            used = self.used.get(d)
            if used is None or (ttl is not None and now - used > ttl):
                break
            hit = i
        for d in digests[: hit + 1]:
            self.used[d] = now
        return 0 if hit < 0 else (self.first + hit) * self.model.step_tokens

    def insert(self, digests: list[bytes], now: float) -> None:
        for d in digests:
            self.used[d] = now


class TestChainedKeysMatchSha256:
    def test_seeded_prompts_get_the_cached_tokens_the_sha256_keys_gave(self) -> None:
        """2,000 seeded lookups and inserts of prompts that share prefixes of every length
        (cut inside blocks and on their edges, two namespaces, non-ASCII text, entries
        expiring): the chained-hash keys give every cached-token count the SHA-256 keys gave."""
        rng = Random(5)
        model = CacheModel(ttl_s=30.0)
        cache, reference = PrefixCache(model), _Sha256PrefixCache(model)
        alphabet = "abcdefgh \n|é€😀"
        bases = ["".join(rng.choice(alphabet) for _ in range(BLOCK * 40)) for _ in range(3)]
        now, counts = 0.0, []
        for _ in range(2000):
            now += rng.choice([0.0, 0.01, 0.5, 5.0, 40.0])
            base = rng.choice(bases)
            shared = rng.choice([rng.randrange(len(base)), BLOCK * rng.randint(1, 40), len(base)])
            tail = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, BLOCK * 3)))
            text, namespace = base[:shared] + tail, rng.choice(["m", "m\x00key"])
            blocks, digests = cache.blocks(namespace, text), reference.blocks(namespace, text)
            got, want = cache.lookup(blocks, now), reference.lookup(digests, now)
            assert got == want, (shared, len(text), now)
            counts.append(got)
            if rng.random() < 0.6:
                cache.insert(blocks, now)
                reference.insert(digests, now)
        # Hits of many lengths, and misses.
        assert len({c for c in counts if c}) > 10 and counts.count(0) > 100


SHARED = "Instructions that every request shares. " * 150  # ~6000 characters, ~1500 tokens


def request(i: int, *, model: str = "sim-model") -> ModelRequest:
    return ModelRequest(model=model, messages=(Message("user", SHARED + f"\nchunk {i}"),), max_tokens=50)


def config(**cache: object) -> SimConfig:
    # "other" requests use the sub latency settings; slow enough that simultaneous requests overlap.
    return SimConfig(
        latency=LatencyModel(sub=KindLatency(ttft_s=0.2, output_s_per_token=0.002)),
        cache=CacheModel(**cache),  # type: ignore[arg-type]
    )


class TestPrefixCacheOverHTTP:
    async def test_simultaneous_cold_requests_all_miss_and_a_later_one_hits(self) -> None:
        """Five requests sent together with the same cold prefix all report 0 cached tokens;
        one sent after they finished reports the shared prefix, in 128-token steps."""
        async with SimServer(config()) as sim:
            transport = OpenAITransport(sim.base_url)
            results: list[Completion | None] = [None] * 5

            async def one(i: int) -> None:
                results[i] = await transport.complete(request(i))

            async with anyio.create_task_group() as tg:
                for i in range(5):
                    tg.start_soon(one, i)
            later = await transport.complete(request(99))
            await transport.aclose()
        assert [r.usage.cached_tokens if r else None for r in results] == [0] * 5
        assert later.usage.cached_tokens >= 1024 and later.usage.cached_tokens % 128 == 0
        assert later.usage.cached_tokens <= later.usage.prompt_tokens
        assert [e.cached_tokens for e in sim.log.by_arrival()] == [0] * 5 + [later.usage.cached_tokens]
        assert sim.log.peak_concurrency(phase="service") == 5  # they really overlapped

    async def test_first_token_mode_lets_a_request_hit_while_the_writer_is_still_decoding(self) -> None:
        """With available_at="first_token", a request that arrives after the first one's
        prefill but before it finished hits; with "finish" it misses."""
        for mode, expect_hit in (("first_token", True), ("finish", False)):
            cfg = SimConfig(
                latency=LatencyModel(sub=KindLatency(ttft_s=0.05, output_s_per_token=0.02)),
                cache=CacheModel(available_at=mode),  # type: ignore[arg-type]
            )
            async with SimServer(cfg) as sim:
                transport = OpenAITransport(sim.base_url)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(transport.complete, request(0))  # echo reply: ~50 tokens, ~1 s decode
                    await anyio.sleep(0.4)
                    second = await transport.complete(request(1))
                await transport.aclose()
            first_entry, second_entry = sim.log.by_arrival()
            assert second_entry.arrival < first_entry.finish, "precondition: the second overlapped the first"
            assert (second.usage.cached_tokens > 0) is expect_hit, mode

    async def test_cache_key_partitions_only_when_configured(self) -> None:
        """prompt_cache_key routes but does not isolate by default; partition_by_cache_key isolates."""
        for partition, expect_hit in ((False, True), (True, False)):
            async with SimServer(config(partition_by_cache_key=partition)) as sim:
                transport = OpenAITransport(sim.base_url)
                base = request(0)
                await transport.complete(
                    ModelRequest(
                        model=base.model, messages=base.messages, max_tokens=50, prompt_cache_key="a"
                    )
                )
                again = await transport.complete(
                    ModelRequest(
                        model=base.model, messages=base.messages, max_tokens=50, prompt_cache_key="b"
                    )
                )
                await transport.aclose()
            assert (again.usage.cached_tokens > 0) is expect_hit
