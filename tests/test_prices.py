"""The price table: genai-prices offline, cached tokens at the cached price, overrides,
unknown models, and reservations that bound what a call can cost."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
from decimal import Decimal

import pytest
import structlog

from rlm_async._events import Event, sinks
from rlm_async._governor import ModelPrice, PriceTable
from rlm_async._types import Usage
from rlm_async.exceptions import ConfigError


class TestTable:
    def test_known_model_with_cached_tokens(self) -> None:
        """gpt-4o-mini: uncached input at $0.15/M, cached at $0.075/M, output at $0.60/M."""
        cost = PriceTable().cost(
            "gpt-4o-mini", Usage(prompt_tokens=1000, completion_tokens=100, cached_tokens=200)
        )
        assert cost == Decimal("0.000195")  # (800 * 0.15 + 200 * 0.075 + 100 * 0.6) / 1e6

    def test_works_without_network(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Pricing never opens a connection: the table ships inside the wheel."""

        def no_network(*args: object) -> None:
            raise AssertionError("genai-prices tried to reach the network")

        monkeypatch.setattr(socket.socket, "connect", no_network)
        monkeypatch.setattr(socket, "create_connection", no_network)
        assert PriceTable().cost("gpt-4o", Usage(1_000_000, 0)) > 0

    def test_tiered_prices_apply(self) -> None:
        """A model priced in tiers costs more per token past its threshold."""
        table = PriceTable()
        small = table.cost("claude-sonnet-4-5", Usage(100_000, 0)) / 100_000
        large = table.cost("claude-sonnet-4-5", Usage(300_000, 0)) / 300_000
        assert large > small


class TestLazyTable:
    def test_table_is_loaded_only_for_a_model_without_override(self) -> None:
        """Importing the engine and pricing overridden models loads neither genai-prices nor
        pydantic (about 11 MB resident); the first model without an override loads them."""
        code = (
            "import sys\n"
            "from rlm_async import RLM\n"
            "from rlm_async._governor import ModelPrice, PriceTable\n"
            "from rlm_async._types import Usage\n"
            "table = PriceTable({'sim-*': ModelPrice.free()})\n"
            "assert table.cost('sim-sub', Usage(10, 10)) == 0\n"
            "print(sorted(m for m in ('genai_prices', 'pydantic') if m in sys.modules))\n"
            "assert table.cost('gpt-4o-mini', Usage(1_000_000, 0)) > 0\n"
            "print(sorted(m for m in ('genai_prices', 'pydantic') if m in sys.modules))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.split("\n")[:2] == ["[]", "['genai_prices', 'pydantic']"]


class TestOverrides:
    def test_exact_override_wins_over_the_table(self) -> None:
        """An override for a model the table knows replaces the table's price."""
        table = PriceTable({"gpt-4o-mini": ModelPrice.free()})
        assert table.cost("gpt-4o-mini", Usage(10_000, 10_000)) == 0

    def test_pattern_override(self) -> None:
        """An fnmatch pattern prices every model it matches (the simulator's names)."""
        table = PriceTable(
            {"sim-*": ModelPrice(input_per_mtok=1.0, cached_input_per_mtok=0.1, output_per_mtok=4.0)}
        )
        cost = table.cost(
            "sim-sub", Usage(prompt_tokens=1_000_000, completion_tokens=500_000, cached_tokens=500_000)
        )
        assert cost == Decimal("0.5") + Decimal("0.05") + Decimal("2")

    def test_per_call_override(self) -> None:
        """A price passed with the call wins over everything."""
        table = PriceTable()
        assert table.cost("gpt-4o", Usage(1000, 1000), override=ModelPrice.free()) == 0

    def test_cached_above_input_is_refused(self) -> None:
        """A cached price above the input price would break reservations: ConfigError."""
        with pytest.raises(
            ConfigError, match=r"cached_input_per_mtok \(2.0\) is above input_per_mtok \(1.0\)"
        ):
            ModelPrice(input_per_mtok=1.0, cached_input_per_mtok=2.0, output_per_mtok=1.0)
        with pytest.raises(ConfigError, match="output_per_mtok is -1"):
            ModelPrice(input_per_mtok=1.0, output_per_mtok=-1)


class TestUnknown:
    def test_unknown_model_costs_nothing_and_warns_once(self) -> None:
        """A model nobody prices costs $0, with one warning log and one event per model."""
        table = PriceTable()
        events: list[Event] = []
        with structlog.testing.capture_logs() as logs, sinks(events.append):
            for _ in range(3):
                assert table.cost("my-local-model-xyz", Usage(100, 100)) == 0
        assert [log["model"] for log in logs] == ["my-local-model-xyz"]
        assert [e.kind for e in events] == ["price.unknown"]
        assert not table.is_priced("my-local-model-xyz")

    def test_required_prices_make_it_an_error(self) -> None:
        """With require_prices, an unknown model is a ConfigError that names the fix."""
        with pytest.raises(ConfigError, match=r"no price known for model 'my-local-model-xyz'.*ModelPrice"):
            PriceTable(require_prices=True).cost("my-local-model-xyz", Usage(1, 1))


class TestReservationBound:
    @pytest.mark.parametrize(
        "model", ["gpt-4o-mini", "gpt-4o", "claude-sonnet-4-5", "gemini-2.5-pro", "sim-x"]
    )
    def test_reserve_cost_bounds_every_outcome(self, model: str) -> None:
        """For any usage within the reserved tokens (any cache split), the cost is at most
        the reservation: no cache hit, the whole output cap."""
        table = PriceTable(
            {"sim-*": ModelPrice(input_per_mtok=3.0, cached_input_per_mtok=0.3, output_per_mtok=9.0)}
        )
        rng = random.Random(model)
        for _ in range(200):
            prompt_bound = rng.choice([1, 100, 10_000, 199_999, 250_000])
            out_bound = rng.randint(1, 20_000)
            reserved = table.reserve_cost(model, prompt_bound, out_bound)
            prompt = rng.randint(0, prompt_bound)
            usage = Usage(prompt, rng.randint(0, out_bound), rng.randint(0, prompt))
            assert table.cost(model, usage) <= reserved
