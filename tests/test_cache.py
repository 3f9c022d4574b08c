"""The prefix-cache planner: shared prefixes, the warm-up rule, bucketed cache keys, and
hit-ratio reporting."""

from __future__ import annotations

import dataclasses
import random

import pytest

from rlm_async._cache import (
    BatchPlan,
    CacheSettings,
    SharedPrefix,
    cacheable_tokens,
    plan_batch,
    shared_prefix,
)
from rlm_async._types import Message, ModelRequest, Usage
from rlm_async.exceptions import ConfigError

SYSTEM = "You are a careful reader answering questions about one chunk of a long document. " * 20
INSTRUCTIONS = (
    "Read the chunk below. List every person named in it with the page they appear on, one per "
    "line, as `name | page`. If nobody is named, answer NONE. Do not guess. " * 40
)
"""About 6,900 characters: with the system prompt, ~2,100 shared tokens at 4 characters a token."""


def chunk(i: int) -> str:
    # Chunks of a document differ from their first character on (here: A, B, C, ...).
    return f"{chr(ord('A') + i % 26)}{i} page {i}: " + "lorem ipsum dolor sit amet " * 200


def sub_request(i: int, *, model: str = "gpt-sub", instructions: str = INSTRUCTIONS) -> ModelRequest:
    return ModelRequest(
        model=model,
        messages=(Message("system", SYSTEM), Message("user", instructions + "\n\nCHUNK:\n" + chunk(i))),
        max_tokens=512,
        temperature=0.0,
    )


def batch(n: int, **kwargs: object) -> list[ModelRequest]:
    return [sub_request(i, **kwargs) for i in range(n)]  # type: ignore[arg-type]


SHARED_CHARS = len("system") + len(SYSTEM) + len("user") + len(INSTRUCTIONS + "\n\nCHUNK:\n")


class TestSharedPrefix:
    def test_realistic_batch_shares_system_and_instructions(self) -> None:
        """System prompt + instructions are shared; the prefix ends where the chunks differ."""
        assert shared_prefix(batch(20)) == SharedPrefix(SHARED_CHARS, SHARED_CHARS // 4)

    def test_chunks_with_a_common_start_extend_the_prefix(self) -> None:
        """The prefix is byte-exact: characters the chunks happen to share count too."""
        a = dataclasses.replace(sub_request(1), messages=(Message("user", "instr: page 10"),))
        b = dataclasses.replace(sub_request(1), messages=(Message("user", "instr: page 11"),))
        assert shared_prefix([a, b]).chars == len("user") + len("instr: page 1")

    def test_one_request_shares_its_whole_prompt(self) -> None:
        """A batch of one: its whole prompt is its own prefix."""
        only = sub_request(3)
        assert shared_prefix([only]).chars == sum(len(m.role) + len(m.content) for m in only.messages)
        assert shared_prefix([]) == SharedPrefix(0, 0)

    def test_different_models_share_nothing(self) -> None:
        """Each model has its own cache."""
        assert shared_prefix([sub_request(0), sub_request(1, model="gpt-other")]).chars == 0

    def test_prefix_stops_at_a_role_or_message_boundary(self) -> None:
        """A differing role, or the same text split into other messages, ends the prefix."""
        sys_first = ModelRequest(model="m", messages=(Message("system", "abc"), Message("user", "x")))
        user_first = ModelRequest(model="m", messages=(Message("user", "abc"), Message("user", "x")))
        assert shared_prefix([sys_first, user_first]).chars == 0
        split = ModelRequest(model="m", messages=(Message("user", "ab"), Message("user", "cd")))
        joined = ModelRequest(model="m", messages=(Message("user", "abcd"),))
        assert shared_prefix([split, joined]).chars == len("user") + len("ab")

    def test_matches_the_common_prefix_of_the_rendered_prompts(self) -> None:
        """Read message by message, the prefix is what the common prefix of every request
        rendered as one string (NUL before each role and each content) gives, cut back to
        a whole role: checked on random batches over a small alphabet, where prefixes,
        role changes and missing messages are common."""
        rng = random.Random(7)

        def rendered_prefix(requests: list[ModelRequest]) -> int:
            texts = ["".join(f"\x00{m.role}\x00{m.content}" for m in r.messages) for r in requests]
            lo, hi = min(texts), max(texts)
            n = 0
            while n < min(len(lo), len(hi)) and lo[n] == hi[n]:
                n += 1
            common = lo[:n]
            if common.count("\x00") % 2:
                common = common[: common.rindex("\x00")]
            return len(common.replace("\x00", ""))

        for _ in range(500):
            requests = [
                ModelRequest(
                    model="m",
                    messages=tuple(
                        Message(
                            rng.choice(("system", "user")), "".join(rng.choices("ab", k=rng.randint(0, 4)))
                        )
                        for _ in range(rng.randint(1, 3))
                    ),
                )
                for _ in range(rng.randint(1, 4))
            ]
            assert shared_prefix(requests).chars == rendered_prefix(requests), requests

    def test_tokens_use_chars_per_token(self) -> None:
        """Token estimates follow the configured ratio, rounded down."""
        assert shared_prefix(batch(2), chars_per_token=3.0).tokens == int(SHARED_CHARS / 3.0)


class TestCacheableTokens:
    @pytest.mark.parametrize(("tokens", "expected"), [(1023, 0), (1024, 1024), (1151, 1024), (2200, 2176)])
    def test_openai_caches_from_1024_in_128_steps(self, tokens: int, expected: int) -> None:
        """Below the minimum nothing is cached; above it, whole steps."""
        assert cacheable_tokens(tokens, CacheSettings.openai()) == expected

    def test_vllm_caches_any_prefix_in_blocks(self) -> None:
        """vLLM caches any prefix, in whole KV blocks; SGLang token by token."""
        assert cacheable_tokens(37, CacheSettings.vllm()) == 32
        assert cacheable_tokens(37, CacheSettings.sglang()) == 37
        assert cacheable_tokens(0, CacheSettings.sglang()) == 0


class TestWarmDecision:
    def test_short_prefix_is_not_warmed(self) -> None:
        """A prefix below the provider's minimum cannot be cached, so nothing waits for it."""
        short = batch(50, instructions="Summarise the chunk.")
        plan = plan_batch(short, CacheSettings.openai(), expected_latency_s=5)
        assert (plan.decision, plan.reason, plan.warmups) == ("skip", "prefix_below_minimum", ())
        assert all(plan.gate(i) is None for i in range(50))

    def test_small_batch_is_not_worth_the_wait(self) -> None:
        """Three requests save ~4k cached tokens: not worth a 10 s wait at the default rate."""
        plan = plan_batch(batch(3), CacheSettings.openai(), expected_latency_s=10)
        assert (plan.decision, plan.reason) == ("skip", "batch_too_small")
        assert "tokens/s" in plan.detail

    def test_large_batch_is_warmed_then_fanned_out(self) -> None:
        """Forty requests: one goes first per bucket, the rest wait for it and hit."""
        plan = plan_batch(batch(40), CacheSettings(), expected_latency_s=10)
        assert (plan.decision, plan.reason) == ("warm", "pays_off")
        assert plan.warmups == (0,)
        assert [plan.gate(i) for i in (0, 1, 39)] == [None, 0, 0]
        assert plan.requests == tuple(batch(40))  # no cache keys by default: unchanged

    def test_longer_expected_latency_tips_the_balance(self) -> None:
        """The same batch is warmed for a 2 s wait but not for a 60 s one."""
        requests = batch(8)
        assert plan_batch(requests, CacheSettings(), expected_latency_s=2).decision == "warm"
        assert plan_batch(requests, CacheSettings(), expected_latency_s=60).decision == "skip"
        assert plan_batch(requests, CacheSettings()).detail.endswith("(threshold 2000)")

    def test_a_single_request_is_never_warmed(self) -> None:
        """Nothing to share with."""
        plan = plan_batch(batch(1), CacheSettings(warm=True))
        assert (plan.decision, plan.reason) == ("skip", "too_few_requests")
        assert plan_batch([], CacheSettings()).requests == ()

    def test_forced_and_disabled(self) -> None:
        """warm=True warms any cacheable batch of two or more; warm=False never warms."""
        assert plan_batch(batch(2), CacheSettings(warm=True)).reason == "forced"
        assert plan_batch(batch(200), CacheSettings(warm=False)).reason == "disabled"

    def test_vllm_preset_warms_by_the_rule_and_caches_short_prefixes(self) -> None:
        """vLLM caches whole 16-token blocks, so a prefix far below OpenAI's minimum is
        cacheable there; whether to warm is the rule's (a block is reused only once the
        request that computed it has been processed), and no cache key is sent."""
        short = batch(100, instructions="Name the people in this chunk.")
        vllm = CacheSettings.vllm()
        assert (vllm.min_cacheable_tokens, vllm.step_tokens, vllm.warm) == (16, 16, "auto")
        plan = plan_batch(short, vllm, expected_latency_s=1)
        assert plan.cacheable_tokens > 0 and all(r.prompt_cache_key is None for r in plan.requests)
        assert plan.reason == "pays_off"
        assert plan_batch(short[:3], vllm, expected_latency_s=1).reason == "batch_too_small"
        off = dataclasses.replace(vllm, warm=False)
        assert plan_batch(short, off).reason == "disabled"

    def test_event_fields_carry_the_reason(self) -> None:
        """The `warmup.decision` event says what was decided and why, with the numbers."""
        fields = plan_batch(batch(3), CacheSettings.openai(), expected_latency_s=10).event_fields()
        assert fields["decision"] == "skip" and fields["reason"] == "batch_too_small"
        assert fields["prefix_tokens"] == SHARED_CHARS // 4 and fields["batch_size"] == 3


class TestCacheKeys:
    def test_buckets_keep_each_key_within_its_rate(self) -> None:
        """100 requests at ~15 per key per minute need 7 keys, each warmed once."""
        plan = plan_batch(batch(100), CacheSettings.openai(), expected_latency_s=5)
        assert plan.decision == "warm" and len(plan.buckets) == 7
        keys = [r.prompt_cache_key for r in plan.requests]
        assert set(keys) == set(plan.buckets)
        assert max(keys.count(k) for k in plan.buckets) <= 15
        assert len(plan.warmups) == 7
        assert {plan.requests[w].prompt_cache_key for w in plan.warmups} == set(plan.buckets)
        for i in range(100):
            gate = plan.gate(i)
            if gate is not None:
                assert plan.requests[gate].prompt_cache_key == plan.requests[i].prompt_cache_key

    def test_a_batch_spread_over_minutes_needs_fewer_keys(self) -> None:
        """At 50 RPM, 100 requests span two minutes, so each key may carry 30."""
        plan = plan_batch(batch(100), CacheSettings.openai(), rpm_hint=50)
        assert len(plan.buckets) == 4

    def test_keys_are_byte_identical_across_runs(self) -> None:
        """Keys hash the prefix and the bucket index: no ids, no timestamps, no hash()."""
        first = plan_batch(batch(30), CacheSettings.openai())
        again = plan_batch(batch(30), CacheSettings.openai())
        assert first.requests == again.requests
        assert first.buckets == ("rlm-ec33e8a30a20f77b-0", "rlm-ec33e8a30a20f77b-1")

    def test_keys_follow_the_instructions_not_the_chunks(self) -> None:
        """A later batch with the same instructions reuses the warm keys; other instructions
        or another model get other keys."""
        base = plan_batch(batch(10), CacheSettings.openai()).buckets
        later = [sub_request(i) for i in range(500, 510)]
        assert plan_batch(later, CacheSettings.openai()).buckets == base
        other = batch(10, instructions=INSTRUCTIONS.replace("person", "place"))
        assert plan_batch(other, CacheSettings.openai()).buckets != base
        assert plan_batch(batch(10, model="gpt-other"), CacheSettings.openai()).buckets != base

    def test_a_key_set_by_the_caller_is_kept(self) -> None:
        """The planner fills in missing keys only."""
        requests = batch(4)
        requests[2] = dataclasses.replace(requests[2], prompt_cache_key="mine")
        plan = plan_batch(requests, CacheSettings.openai())
        assert plan.requests[2].prompt_cache_key == "mine"
        assert plan.requests[1].prompt_cache_key == plan.buckets[0]

    def test_no_keys_below_the_cacheable_minimum(self) -> None:
        """A key for a prefix that cannot be cached would only constrain routing."""
        plan = plan_batch(batch(20, instructions="Summarise."), CacheSettings.openai())
        assert all(r.prompt_cache_key is None for r in plan.requests)

    def test_recently_warmed_buckets_are_not_warmed_again(self) -> None:
        """Buckets the caller warmed recently go out at once; only cold ones are warmed."""
        settings = CacheSettings.openai()
        first = plan_batch(batch(100), settings, expected_latency_s=5)
        again = plan_batch(batch(100), settings, expected_latency_s=5, already_warm=set(first.buckets))
        assert (again.decision, again.reason, again.warmups) == ("skip", "already_warm", ())
        partly = plan_batch(batch(100), settings, expected_latency_s=5, already_warm={first.buckets[0]})
        assert partly.decision == "warm" and len(partly.warmups) == 6
        assert partly.gate(0) is None and partly.gate(7) is None  # bucket 0 is warm


class TestSettings:
    @pytest.mark.parametrize(
        "bad",
        [
            {"min_cacheable_tokens": -1},
            {"warm": "sometimes"},
            {"ready_on": "later"},
            {"per_key_rpm": 0},
            {"chars_per_token": 0},
            {"assumed_latency_s": 0},
        ],
    )
    def test_misuse_is_refused_at_construction(self, bad: dict[str, object]) -> None:
        """Nonsense settings raise ConfigError naming the field."""
        with pytest.raises(ConfigError, match=next(iter(bad))):
            CacheSettings(**bad)  # type: ignore[arg-type]

    def test_plan_is_frozen(self) -> None:
        """Plans are plain data."""
        plan = plan_batch(batch(2), CacheSettings())
        with pytest.raises(dataclasses.FrozenInstanceError):
            plan.decision = "warm"  # type: ignore[misc]
        assert isinstance(plan, BatchPlan)


class TestStats:
    def test_hit_ratio_is_cached_over_prompt_tokens(self) -> None:
        """The ratio the servers reported; None when there is nothing to divide."""
        assert sum([Usage(1000, 10, 0), Usage(1000, 10, 500)], Usage()).cache_hit_ratio == 0.25
        assert Usage().cache_hit_ratio is None
