"""What a call costs: the bundled genai-prices table, with per-model overrides.

Why genai-prices rather than a hand-written table: it is maintained (pydantic's project,
prices for every major provider with dated price changes), it knows cached-input and tiered
("over 200k tokens") prices a hand table gets wrong, and its data ships inside the wheel:
`calc_price` reads the bundled snapshot and never touches the network unless you call its
`UpdatePrices` (we never do). A hand-written table goes stale the day a price changes.

Overrides (`ModelPrice`) win over the table: $0 for a self-hosted model (a local vLLM
serving "Qwen/Qwen3-8B" may otherwise match some provider's hosted price), or prices for
the simulator's model names. Override keys are exact model names or `fnmatch` patterns
("sim-*").

A model that neither the overrides nor the table knows costs $0 with a warning logged once
per model, unless `require_prices=True`, which makes it a `ConfigError` before any call is
sent. A dollar cap over an unpriced model is refused once, where a query starts (the
engine checks every model the tree may call): a cap that cannot count would silently not
limit anything.

Money is `Decimal`, so sums are exact and a cap of $1.00 admits exactly the calls that fit.

genai-prices is imported on the first model that no override prices, not with this module:
it brings pydantic, about 11 MB of resident memory in every process (the engine's own
imports are about 50 MB), which a run whose models all have overrides (a self-hosted model,
the simulator) never needs.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import structlog

from .._events import PriceUnknown, emit
from .._types import Usage
from ..exceptions import ConfigError

__all__ = ["ModelPrice", "PriceTable"]

_log = structlog.get_logger("rlm_async.governor")
_MILLION = Decimal(1_000_000)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelPrice:
    """A model's price in US dollars per million tokens."""

    input_per_mtok: float
    """Uncached prompt tokens."""
    output_per_mtok: float
    """Completion tokens (reasoning tokens included, as servers report them)."""
    cached_input_per_mtok: float | None = None
    """Prompt tokens served from the provider's prefix cache; `None` charges them at the
    input price."""

    def __post_init__(self) -> None:
        for name in ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ConfigError(f"ModelPrice.{name} is {value}; prices must be >= 0")
        if self.cached_input_per_mtok is not None and self.cached_input_per_mtok > self.input_per_mtok:
            # Reservations assume no cache hit; that is an upper bound only if a hit is cheaper.
            raise ConfigError(
                f"ModelPrice.cached_input_per_mtok ({self.cached_input_per_mtok}) is above "
                f"input_per_mtok ({self.input_per_mtok}); a cache hit must not cost more"
            )

    @classmethod
    def free(cls) -> ModelPrice:
        """$0 everywhere: a self-hosted model."""
        return cls(input_per_mtok=0.0, output_per_mtok=0.0)

    def reserve_cost(self, prompt_tokens: int, output_tokens: int) -> Decimal:
        """The most a call of `prompt_tokens` and `output_tokens` can cost: its prompt priced
        uncached or all cached, whichever is dearer (`PriceTable.reserve_cost`)."""
        cached = self.input_per_mtok if self.cached_input_per_mtok is None else self.cached_input_per_mtok
        prompt = _dec(max(self.input_per_mtok, cached)) * prompt_tokens
        return (prompt + _dec(self.output_per_mtok) * output_tokens) / _MILLION

    def cost(self, usage: Usage) -> Decimal:
        cached_price = (
            self.input_per_mtok if self.cached_input_per_mtok is None else self.cached_input_per_mtok
        )
        total = (
            _dec(self.input_per_mtok) * usage.uncached_prompt_tokens
            + _dec(cached_price) * usage.cached_tokens
            + _dec(self.output_per_mtok) * usage.completion_tokens
        )
        return total / _MILLION


def _dec(value: float) -> Decimal:
    # str: 0.15 stays 0.15, not 0.1499999999999999944... Kept per value: every call prices
    # its reservation and its usage with the same few prices.
    key = (type(value), value)  # 1 and 1.0 are equal keys, but "1" and "1.0" two Decimals
    found = _DECIMALS.get(key)
    if found is None:
        found = Decimal(str(value))
        if len(_DECIMALS) < 4096:
            _DECIMALS[key] = found
    return found


_DECIMALS: dict[tuple[type, float], Decimal] = {}


Pricer = Callable[[Usage], Decimal]


class PriceTable:
    """Resolves a model name to its price and computes costs as exact `Decimal` dollars."""

    def __init__(
        self, overrides: Mapping[str, ModelPrice] | None = None, *, require_prices: bool = False
    ) -> None:
        self._overrides: dict[str, ModelPrice] = dict(overrides or {})
        self.require_prices = require_prices
        self._resolved: dict[str, Pricer | None] = {}
        self._warned: set[str] = set()

    def set_price(self, model: str, price: ModelPrice) -> None:
        """Add or replace an override (an exact name or an fnmatch pattern)."""
        self._overrides[model] = price
        self._resolved.clear()

    def is_priced(self, model: str, override: ModelPrice | None = None) -> bool:
        return override is not None or self._pricer(model) is not None

    def cost(self, model: str, usage: Usage, *, override: ModelPrice | None = None) -> Decimal:
        """The dollars `usage` costs on `model`: uncached input, cached input at the cached
        price, output. $0 for an unpriced model (see the module docstring)."""
        if override is not None:
            return override.cost(usage)
        pricer = self._pricer(model)
        if pricer is None:
            self._unpriced(model)
            return Decimal(0)
        return pricer(usage)

    def reserve_cost(
        self, model: str, prompt_tokens: int, output_tokens: int, *, override: ModelPrice | None = None
    ) -> Decimal:
        """An upper bound on what a call can cost: no cache hit, the whole output cap.
        Taking the larger of "no hit" and "all hit" keeps it a bound even for a table entry
        whose cached price were above its input price."""
        if override is not None:  # the engine's case: every configured model has its price
            return override.reserve_cost(prompt_tokens, output_tokens)
        cold = Usage(prompt_tokens, output_tokens, 0)
        warm = Usage(prompt_tokens, output_tokens, prompt_tokens)
        return max(self.cost(model, cold, override=override), self.cost(model, warm, override=override))

    # ------------------------------------------------------------------ resolution
    def _pricer(self, model: str) -> Pricer | None:
        try:
            return self._resolved[model]
        except KeyError:
            pass
        pricer = self._resolve(model)
        self._resolved[model] = pricer
        return pricer

    def _resolve(self, model: str) -> Pricer | None:
        override = self._overrides.get(model)
        if override is None:
            for pattern, price in self._overrides.items():
                if fnmatch.fnmatchcase(model, pattern):
                    override = price
                    break
        if override is not None:
            return override.cost
        from genai_prices import data_snapshot

        try:
            _, info = data_snapshot.get_snapshot().find_provider_model(model, None, None, None)
        except LookupError:
            return None
        # Resolve today's price once: dated price changes are rare and a process is short.
        table_price = info.get_prices(datetime.now(tz=UTC))
        return _GenaiPricer(table_price)

    def _unpriced(self, model: str) -> None:
        if self.require_prices:
            raise ConfigError(
                f"no price known for model {model!r}: add one with ModelPrice(input_per_mtok=..., "
                "output_per_mtok=...) (ModelPrice.free() for a self-hosted model), or set "
                "require_prices=False to count it as $0"
            )
        if model not in self._warned:
            self._warned.add(model)
            _log.warning(
                "no price known for model; counting it as $0",
                model=model,
                fix="set a ModelPrice override for it",
            )
            emit(PriceUnknown, model=model)


class _GenaiPricer:
    """Prices a `Usage` with one of genai-prices' resolved price records."""

    __slots__ = ("_price", "_usage")

    def __init__(self, price: Any) -> None:
        from genai_prices import Usage as GenaiUsage

        self._price = price
        self._usage = GenaiUsage

    def __call__(self, usage: Usage) -> Decimal:
        # genai-prices counts `input_tokens` including cache reads, as OpenAI reports them.
        calc = self._price.calc_price(
            self._usage(
                input_tokens=usage.prompt_tokens,
                cache_read_tokens=usage.cached_tokens,
                output_tokens=usage.completion_tokens,
            )
        )
        return Decimal(calc["total_price"])
