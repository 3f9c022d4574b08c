"""The native, typed configuration: frozen kw-only dataclasses, `None` disables a limit.

`RLM(...)` (the official-compatible constructor) maps its keyword arguments onto
`RLMConfig`; `RLMConfig.from_toml(path)` reads the files under `configs/`. Each layer owns
the dataclass for its own settings (`BudgetLimits` and `EndpointLimits` in the governor,
`CacheSettings` in the cache planner, `SandboxConfig` in the sandbox); this module composes
them and is the only place that knows the TOML layout.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ._cache import CacheSettings
from ._governor import BudgetLimits, EndpointLimits, GovernorConfig, ModelPrice
from .exceptions import ConfigError
from .sandbox import SandboxConfig

__all__ = ["ModelConfig", "RLMConfig", "load_dataclass"]

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """One model on one OpenAI-compatible endpoint."""

    model: str
    """The model name sent to the endpoint (and the name `llm_query(..., model=...)` selects)."""
    base_url: str = "https://api.openai.com/v1"
    """The endpoint's base URL, up to and including `/v1`."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the API key. Keys never come from files in the repo;
    `None` (or `""` in TOML, which has no null) sends no key (a local server)."""
    max_tokens: int | None = 4096
    """Output cap per call, sent as `max_tokens`; also what budgets and TPM meters reserve
    for output. `None` sends `GovernorConfig.default_max_tokens`, so output always has a
    bound that budgets can reserve."""
    temperature: float | None = None
    """Sampling temperature; `None` uses the server's default. With a journal, a
    temperature-0 call is one answer however often it is asked; a sampled call is replayed
    occurrence by occurrence (see `RLMConfig.journal_reuse_nondeterministic`)."""
    timeout_s: float = 600.0
    """Per-request HTTP timeout."""
    prices: ModelPrice | None = None
    """Overrides the price table for this model (e.g. all zero for a self-hosted model)."""
    limits: EndpointLimits = field(default_factory=EndpointLimits)
    """Concurrency, requests/minute and tokens/minute for this endpoint+model, shared by
    every query in the process. The default caps only concurrency, at the size of the
    transport's connection pool: rate limits are the provider's to state."""
    cache: CacheSettings | None = None
    """How this provider caches prompt prefixes (cacheable minimum, warm-up, cache keys).
    `None` picks by `base_url`: `CacheSettings.openai()` for api.openai.com (cache keys
    sent), else OpenAI-like semantics without cache keys."""

    def cache_settings(self) -> CacheSettings:
        if self.cache is not None:
            return self.cache
        if "api.openai.com" in self.base_url:
            return CacheSettings.openai()
        return CacheSettings()


@dataclass(frozen=True, kw_only=True)
class RLMConfig:
    """Everything one `RLM` needs. Build it directly, from `RLM(...)`, or from TOML."""

    root: ModelConfig
    """The root model (depth 0)."""
    sub: ModelConfig | None = None
    """The model for sub-calls and child RLMs (depth >= 1); `None` uses `root`."""
    depth_models: tuple[ModelConfig, ...] = ()
    """Per-depth override: entry d serves calls at depth d (d = 0 is the root)."""
    others: tuple[ModelConfig, ...] = ()
    """More models the REPL may pick by name: `llm_query(prompt, model="name")`."""
    max_depth: int = 1
    """Recursion bound. An RLM at depth d may start a child RLM only while d + 1 < max_depth;
    past that `rlm_query` is a plain `llm_query`. 1 is the paper's setting."""
    max_iterations: int = 30
    """Root-model turns per RLM loop before one last call asks for a final answer."""
    output_limit_chars: int = 20_000
    """Each code block's output is cut to this many characters, once, when appended."""
    system_prompt: str | None = None
    """Replaces the built-in root system prompt."""
    budget: BudgetLimits = field(default_factory=BudgetLimits)
    """Per-query caps over the whole tree, children included."""
    governor: GovernorConfig = field(default_factory=GovernorConfig)
    """Retries and process-wide defaults of the governor."""
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    """Isolation and resource limits of the REPL workers."""
    journal_path: str | None = None
    """SQLite response journal; `None` keeps no journal."""
    journal_reuse_nondeterministic: bool = True
    """Also replay sampled calls (temperature unset or above 0) from the journal: the n-th
    identical sampled call of a run gets the n-th recorded answer, so a re-run or a resume
    after a crash pays for nothing twice and identical samples stay distinct. Off: only
    temperature-0 calls are reused; sampled ones are sent afresh (and still recorded)."""
    keep_events: bool = False
    """Put the query's events in `RLMResult.events` (what a JSONL trace holds)."""
    log_text: bool = False
    """Put prompt and reply text in call events (and so in traces). Off by default: prompts
    carry chunks of the context, which may be private."""

    def __post_init__(self) -> None:
        if self.max_depth < 1:
            raise ConfigError(
                f"max_depth is {self.max_depth}; it must be at least 1 (1 = the paper's setting)"
            )
        if self.max_iterations < 1:
            raise ConfigError(f"max_iterations is {self.max_iterations}; it must be at least 1")
        if self.output_limit_chars < 100:
            raise ConfigError(f"output_limit_chars is {self.output_limit_chars}; use at least 100")

    def model_for_depth(self, depth: int) -> ModelConfig:
        if depth < len(self.depth_models):
            return self.depth_models[depth]
        if depth == 0:
            return self.root
        return self.sub or self.root

    def all_models(self) -> list[ModelConfig]:
        models = [self.root, *([self.sub] if self.sub else []), *self.depth_models, *self.others]
        return models

    def model_names(self) -> set[str]:
        return {m.model for m in self.all_models()}

    def model_named(self, name: str) -> ModelConfig | None:
        for m in self.all_models():
            if m.model == name:
                return m
        return None

    @classmethod
    def from_toml(cls, path: str | Path) -> RLMConfig:
        """Read a config file (see `configs/`). Unknown keys are errors that name the key."""
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist; see configs/ for examples") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
        data.pop("sim", None)  # the simulator's own table, read by the CLI that starts it
        return cls.from_dict(data, where=str(p))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "config") -> RLMConfig:
        data = dict(data)
        rlm = dict(data.pop("rlm", {}))
        if "root" not in data:
            raise ConfigError(f"{where}: a [root] table with at least `model = ...` is required")
        kwargs: dict[str, Any] = {**rlm}
        kwargs["root"] = load_dataclass(ModelConfig, data.pop("root"), f"{where} [root]")
        if "sub" in data:
            kwargs["sub"] = load_dataclass(ModelConfig, data.pop("sub"), f"{where} [sub]")
        if "others" in data:
            kwargs["others"] = tuple(
                load_dataclass(ModelConfig, o, f"{where} [[others]]") for o in data.pop("others")
            )
        if "depth_models" in data:
            kwargs["depth_models"] = tuple(
                load_dataclass(ModelConfig, o, f"{where} [[depth_models]]") for o in data.pop("depth_models")
            )
        for key, typ in (("budget", BudgetLimits), ("governor", GovernorConfig), ("sandbox", SandboxConfig)):
            if key in data:
                kwargs[key] = load_dataclass(typ, data.pop(key), f"{where} [{key}]")
        if "journal" in data:
            journal = dict(data.pop("journal"))
            unknown = set(journal) - {"path", "reuse_nondeterministic"}
            if unknown:
                raise ConfigError(
                    f"{where} [journal]: unknown key(s) {sorted(unknown)}; known: path, reuse_nondeterministic"
                )
            kwargs["journal_path"] = journal.get("path")
            kwargs["journal_reuse_nondeterministic"] = bool(journal.get("reuse_nondeterministic", True))
        if data:
            raise ConfigError(
                f"{where}: unknown table(s) {sorted(data)}; known: root, sub, others, depth_models, rlm, "
                "budget, governor, sandbox, journal, sim"
            )
        return load_dataclass(cls, kwargs, where)


def load_dataclass(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """Build a (nested) config dataclass from a TOML table, naming any unknown key."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    assert dataclasses.is_dataclass(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        nested = _dataclass_in(hints[name])
        if nested is not None and isinstance(value, Mapping):
            value = load_dataclass(nested, value, f"{where}.{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg) and isinstance(arg, type):
                return arg
    return None
