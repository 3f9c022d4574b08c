"""Misuse is refused by `RLM(...)` itself, naming the fix, before any completion() is asked."""

from __future__ import annotations

import pytest

from rlm_async import RLM, BudgetLimits, ConfigError, MissingAPIKey, ModelConfig, ModelPrice, RLMConfig


class TestRefusedAtConstruction:
    def test_missing_api_key(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """No OPENAI_API_KEY for api.openai.com: RLM(...) raises MissingAPIKey naming it."""
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        with pytest.raises(MissingAPIKey, match="OPENAI_API_KEY"):
            RLM(backend="openai", backend_kwargs={"model_name": "gpt-5-mini"})

    def test_a_local_server_needs_no_key(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A loopback base_url (a running simulator, vLLM, llama.cpp) constructs without a key."""
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        RLM(
            backend="openai",
            backend_kwargs={"model_name": "sim-model", "base_url": "http://127.0.0.1:8642/v1"},
        )

    def test_a_dollar_cap_over_an_unpriced_model(self) -> None:
        """max_usd over a model with no known price: ConfigError naming the model and ModelPrice."""
        model = ModelConfig(model="my-local-model-xyz", base_url="http://127.0.0.1:9/v1", api_key_env=None)
        config = RLMConfig(root=model, budget=BudgetLimits(max_usd=1.0))
        with pytest.raises(
            ConfigError, match=r"no price is known for model\(s\) \['my-local-model-xyz'\].*ModelPrice"
        ):
            RLM(config=config)

    def test_a_priced_model_under_a_dollar_cap_is_fine(self) -> None:
        """The same model with a ModelPrice constructs."""
        model = ModelConfig(
            model="my-local-model-xyz",
            base_url="http://127.0.0.1:9/v1",
            api_key_env=None,
            prices=ModelPrice.free(),
        )
        RLM(config=RLMConfig(root=model, budget=BudgetLimits(max_usd=1.0)))
