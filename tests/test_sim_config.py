"""The simulator's configuration, tokenizer and latency model: pure functions, no server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlm_async._types import Message
from rlm_async.exceptions import ConfigError
from rlm_async.sim import (
    CacheModel,
    Faults,
    KindLatency,
    LatencyModel,
    PolicySpec,
    RateLimits,
    SimConfig,
    count_tokens,
    prompt_tokens,
    serialize_messages,
)

TOML = """
[sim]
seed = 7
models = ["a", "b"]
context_window = 200000

[sim.latency.root]
ttft_s = 0.5
prefill_s_per_token = 2e-5
output_s_per_token = 0.015
jitter = 0.1
capacity = 8

[sim.latency.sub]
ttft_s = 1

[sim.cache]
available_at = "first_token"
ttl_s = 60

[sim.rate_limits]
rpm = 500
tpm = 2_000_000

[sim.faults]
error_500 = 0.01
script = ["drop", "ok"]

[sim.policies.root]
name = "rlm"
chunks = 10
fanout = "rlm_query_batched"
"""


class TestConfig:
    def test_from_toml_reads_every_table(self, tmp_path: Path) -> None:
        """A [sim] TOML table fills every nested dataclass, with policy options flattened."""
        path = tmp_path / "sim.toml"
        path.write_text(TOML)
        config = SimConfig.from_toml(path)
        assert config.seed == 7 and config.models == ("a", "b")
        assert config.latency.root == KindLatency(
            ttft_s=0.5, prefill_s_per_token=2e-5, output_s_per_token=0.015, jitter=0.1, capacity=8
        )
        assert config.latency.sub.ttft_s == 1.0 and isinstance(config.latency.sub.ttft_s, float)
        assert config.cache == CacheModel(available_at="first_token", ttl_s=60.0)
        assert config.rate_limits == RateLimits(rpm=500, tpm=2_000_000)
        assert config.faults.script == ("drop", "ok")
        assert config.policies.root == PolicySpec(
            name="rlm", options={"chunks": 10, "fanout": "rlm_query_batched"}
        )
        assert config.policies.sub.name == "reader"

    def test_unknown_key_is_named(self) -> None:
        """A typo in a table raises ConfigError naming the key and where it was."""
        with pytest.raises(ConfigError, match=r"unknown key\(s\) in \[sim.latency.root\]: \['ttft'\]"):
            SimConfig.from_dict({"latency": {"root": {"ttft": 1}}})

    def test_round_trip_through_json(self) -> None:
        """to_dict() is JSON-ready and from_dict() reads it back to an equal config, None included."""
        config = SimConfig(
            seed=3,
            cache=CacheModel(ttl_s=None),
            faults=Faults(drop=0.2, script=("ok", "error_500")),
            latency=LatencyModel.realistic(),
        )
        again = SimConfig.from_dict(json.loads(json.dumps(config.to_dict())))
        assert again == config

    def test_invalid_values_raise_at_construction(self) -> None:
        """Fault probabilities over 1, unknown scripted faults and bad jitter are refused up front."""
        with pytest.raises(ConfigError, match="sum"):
            Faults(error_500=0.6, drop=0.6)
        with pytest.raises(ConfigError, match="unknown fault"):
            Faults(script=("explode",))
        with pytest.raises(ConfigError, match="jitter"):
            KindLatency(jitter=1.5)

    def test_fault_draw_uses_exclusive_bands(self) -> None:
        """Each fault owns a band of [0, 1) in a fixed order; kinds outside `kinds` never fault."""
        faults = Faults(error_500=0.1, error_429=0.1, drop=0.1, malformed=0.1, slow=0.1, kinds=("sub",))
        assert [faults.draw(u, "sub") for u in (0.05, 0.15, 0.25, 0.35, 0.45, 0.55)] == [
            "error_500",
            "error_429",
            "drop",
            "malformed",
            "slow",
            "ok",
        ]
        assert faults.draw(0.05, "root") == "ok"


class TestTokens:
    def test_four_characters_of_the_serialization_make_a_token(self) -> None:
        """Prompt tokens are ceil(len(serialization) / 4), and clients can compute them exactly."""
        messages = [Message("system", "abc"), Message("user", "hello")]
        text = serialize_messages(messages)
        assert text == "<|system|>abc<|end|><|user|>hello<|end|><|assistant|>"
        assert prompt_tokens(messages) == -(-len(text) // 4)
        assert prompt_tokens(
            [{"role": "system", "content": "abc"}, {"role": "user", "content": "hello"}]
        ) == (prompt_tokens(messages))
        assert count_tokens("") == 0 and count_tokens("abcd") == 1 and count_tokens("abcde") == 2


class TestLatencyModel:
    def test_latency_is_ttft_plus_uncached_prefill_plus_decode(self) -> None:
        """Latency charges prefill only for uncached tokens, and root and sub have separate settings."""
        model = LatencyModel(
            root=KindLatency(ttft_s=1.0, prefill_s_per_token=0.001, output_s_per_token=0.01),
            sub=KindLatency(ttft_s=0.1),
        )
        assert model.latency("root", prompt_tokens=2000, completion_tokens=100) == pytest.approx(1 + 2 + 1)
        assert model.latency(
            "root", prompt_tokens=2000, cached_tokens=1536, completion_tokens=100
        ) == pytest.approx(1 + 0.464 + 1)
        assert model.latency("sub", prompt_tokens=2000, completion_tokens=100) == pytest.approx(0.1)
        assert model.latency("other", prompt_tokens=2000, completion_tokens=100) == pytest.approx(0.1)

    def test_jitter_scales_both_phases_within_its_band(self) -> None:
        """Jitter multiplies by U[1-j, 1+j]; lower_bound is the fastest the jitter allows."""
        model = LatencyModel(sub=KindLatency(ttft_s=1.0, output_s_per_token=0.01, jitter=0.2))
        kw = {"prompt_tokens": 10, "completion_tokens": 100}
        assert model.latency("sub", **kw, jitter_u=0.5) == pytest.approx(2.0)
        assert model.lower_bound("sub", **kw) == pytest.approx(1.6)
        assert model.latency("sub", **kw, jitter_u=0.999999) == pytest.approx(2.4, rel=1e-5)
        first, decode = model.phases("sub", **kw, jitter_u=0.0)
        assert first == pytest.approx(0.8) and decode == pytest.approx(0.8)
