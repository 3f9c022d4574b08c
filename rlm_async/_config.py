"""The native, typed configuration: frozen kw-only dataclasses, `None` disables a limit.

`RLM(...)` (the official-compatible constructor) maps its keyword arguments onto
`RLMConfig`; `RLMConfig.from_toml(path)` reads the files under `configs/`. Each layer owns
the dataclass for its own settings (`BudgetLimits` and `EndpointLimits` in the governor,
`CacheSettings` in the cache planner, `SandboxConfig` in the sandbox); this module composes
them and is the only place that knows the TOML layout.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ._cache import CacheSettings
from ._checks import is_number, is_whole_number
from ._governor import BudgetLimits, EndpointLimits, GovernorConfig, ModelPrice
from ._official_prompts import OfficialPrompt
from ._servers import SERVER_KINDS
from ._tools import ToolSet
from .exceptions import ConfigError
from .sandbox import SandboxConfig

__all__ = ["HedgeConfig", "ModelConfig", "RLMConfig", "load_dataclass", "read_toml"]

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class HedgeConfig:
    """Hedged sub-calls: a duplicate of a straggling sub-call, the first answer wins and the
    other request is cancelled. Off by default; `HedgeConfig(enabled=True)` (in TOML
    `[sub.hedge]` with `enabled = true`) turns on the defaults, which a simulation of
    lognormal latency (sigma 0.6) tuned for about 12-14 % extra requests. Every copy is a
    governed call with its own budget reservation: no reservation, no hedge.

    Not a way to get several samples: a sampled call (temperature > 0) returns the one
    sample that finished first."""

    enabled: bool = False
    """Send hedges for this model's calls: plain `llm_*` sub-calls, and the turns of child
    RLMs running on it (not the root's turns)."""
    stages: tuple[float, ...] = (0.9, 0.97, 0.99)
    """Finished shares of a fan-out: once this share of it has finished, every sub-call
    still running gets one more copy (the n-th stage allows n + 1 copies in all)."""
    quantile: float | None = 0.95
    """A sub-call whose only copy has run longer than this quantile of the latencies seen
    for this model in this process (completed fan-outs only: an unfinished one shows only
    its fast calls) gets a hedge; what hedges a single `llm_query`. `None`: off."""
    min_samples: int = 20
    """Latencies needed before `quantile` is trusted."""
    straggler_factor: float | None = 1.2
    """After the last stage, a sub-call whose newest copy has run longer than this many
    times the fan-out's median latency gets another copy. `None`: off."""
    min_ratio: float = 1.25
    """No rule sends a copy of a sub-call younger than this many times the median latency
    (the fan-out's, or for `quantile` the model's history): without a tail, the last 10 %
    of a fan-out finish moments after the rest and must not be hedged."""
    max_copies: int = 5
    """Copies of one sub-call at most, the original included."""
    max_share: float = 0.15
    """Extra copies per fan-out at most, as a share of its size (at least 1)."""
    max_in_flight: int | None = 256
    """Hedge copies in flight at once in the process (over every fan-out); `None`: no cap."""

    def __post_init__(self) -> None:
        if any(not 0.0 < s < 1.0 for s in self.stages) or list(self.stages) != sorted(self.stages):
            raise ConfigError(f"hedge stages must be increasing shares in (0, 1), got {self.stages}")
        if self.quantile is not None and not 0.0 < self.quantile < 1.0:
            raise ConfigError(f"hedge quantile must be in (0, 1) or None, got {self.quantile}")
        if self.min_samples < 1:
            raise ConfigError(f"hedge min_samples is {self.min_samples}; use >= 1")
        if self.straggler_factor is not None and not self.straggler_factor > 0:
            raise ConfigError(f"hedge straggler_factor is {self.straggler_factor}; use > 0 or None")
        if not self.min_ratio >= 0:
            raise ConfigError(f"hedge min_ratio is {self.min_ratio}; use >= 0")
        if self.max_copies < 1:
            raise ConfigError(f"hedge max_copies is {self.max_copies}; use >= 1")
        if not 0.0 <= self.max_share <= 10.0:
            raise ConfigError(f"hedge max_share is {self.max_share}; use a share in [0, 10]")
        if self.max_in_flight is not None and self.max_in_flight < 0:
            raise ConfigError(f"hedge max_in_flight is {self.max_in_flight}; use >= 0 or None")


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
    """Per-request HTTP timeout: from the request's start (waiting for a connection included)
    to its whole answer; the transport checks it every eighth of it (at most every second)."""
    prices: ModelPrice | None = None
    """Overrides the price table for this model (e.g. all zero for a self-hosted model)."""
    limits: EndpointLimits = field(default_factory=EndpointLimits)
    """Concurrency, requests/minute and tokens/minute for this endpoint+model, shared by
    every query in the process. The default caps only concurrency, at the size of the
    transport's connection pool: rate limits are the provider's to state."""
    cache: CacheSettings | None = None
    """How this provider caches prompt prefixes (cacheable minimum, warm-up, cache keys).
    `None` follows the server (see `server`): `CacheSettings.openai()` for api.openai.com,
    `.vllm()` for a vLLM server, ...; for a server not identified, OpenAI-like semantics
    without cache keys."""
    server: str = "auto"
    """What the server is: "auto" identifies it at its first use (`GET /v1/models` and one
    more probe) and defaults the cache settings, context window, token counting and
    concurrency from it (explicit settings here always win); "off" probes nothing and keeps
    the generic defaults; a kind ("vllm", "sglang", "llamacpp", "llama-cpp-python",
    "ollama", "openai") skips identification but still reads what the server reports.
    `rlm-async doctor --config FILE` shows the outcome."""
    context_window: int | None = None
    """The model's context window in tokens (prompt + `max_tokens`). `None` uses what the
    server reports (vLLM `max_model_len`, llama.cpp `n_ctx`), if anything. A prompt that
    cannot fit is refused before it is sent, and `max_tokens` is cut to what fits."""

    hedge: HedgeConfig = field(default_factory=HedgeConfig)
    """Hedged sub-calls for this model (off by default); see `HedgeConfig`."""
    sampling: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """More fields sent in every request to this model as they are (`top_p`, `seed`,
    `stop`, `reasoning_effort`, ...: the official `sampling_args`). Part of the journal key.
    The fields the engine writes itself (`model`, `messages`, `max_tokens`, `temperature`,
    `stream`, `n`, `prompt_cache_key`) are refused here: set `max_tokens` and `temperature`
    above."""

    def __post_init__(self) -> None:
        reserved = sorted(set(self.sampling) & _ENGINE_FIELDS)
        if reserved:
            raise ConfigError(
                f"sampling sets {reserved}, which the engine writes itself; set max_tokens and "
                "temperature on the model (ModelConfig) instead, and leave the others out"
            )
        if self.server not in ("auto", "off", *SERVER_KINDS):
            raise ConfigError(
                f"server is {self.server!r}; use 'auto', 'off' or one of {', '.join(SERVER_KINDS)}"
            )
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"model is {self.model!r}; name the model the endpoint serves")
        if self.max_tokens is not None:
            _whole_number("max_tokens", self.max_tokens, or_none=True)
            if self.max_tokens < 1:
                raise ConfigError(
                    f"max_tokens is {self.max_tokens}; use a positive number of tokens, or None"
                )
        if self.temperature is not None and not (
            is_number(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0
        ):
            raise ConfigError(
                f"temperature is {self.temperature!r}; use a number >= 0 (0 to 2 on OpenAI), or None"
            )
        if not is_number(self.timeout_s) or not self.timeout_s > 0:
            raise ConfigError(f"timeout_s is {self.timeout_s!r}; use a number of seconds > 0")
        if self.context_window is not None:
            _whole_number("context_window", self.context_window, or_none=True)
            if self.context_window < 1:
                raise ConfigError(f"context_window is {self.context_window}; use a positive number or None")

    def cache_settings(self) -> CacheSettings:
        if self.cache is not None:
            return self.cache
        if "api.openai.com" in self.base_url:
            return CacheSettings.openai()
        return CacheSettings()


_ENGINE_FIELDS = frozenset(
    {"model", "messages", "max_tokens", "temperature", "stream", "n", "prompt_cache_key"}
)


def _whole_number(name: str, value: object, *, or_none: bool = False) -> None:
    if not is_whole_number(value):
        raise ConfigError(
            f"{name} is {value!r}; it must be a whole number (an int){', or None' if or_none else ''}"
        )


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
    """Each code block's output is cut to this many characters, once, when appended; the
    whole observation of one turn to four times as many."""
    turn_timeout_s: float | None = 300.0
    """Wall-clock bound on running all the code blocks of one reply together, sub-calls
    included. A block still running at the bound is stopped (its worker is killed and
    replaced), the blocks after it are not run, and the model is told which. `None`: no
    bound (each block still has `SandboxConfig.cell_timeout_s`)."""
    max_pending_subcalls: int | None = 10_000
    """Sub-call prompts one query may have admitted and unanswered at once, over its whole
    tree. Prompts of a request past it (or past the calls the budget has left, or after the
    deadline) are refused before any work, in one piece: their slots hold an "Error:"
    string. Bounds the engine's memory and CPU per query whatever batch the code asks for."""
    max_workers: int | None = 32
    """REPL workers alive at once in the process (all queries of this event loop that share
    this number), roots and child RLMs together; more wait for a slot. Each worker is one
    Python process: about 50 MB resident plus its context (up to
    `SandboxConfig.memory_bytes`), so size it as the memory you give workers divided by
    that. Deeper workers are always left a slot (see `_engine/slots.py`), so nested RLMs
    cannot deadlock; it must be at least `max_depth`. `None`: no cap."""
    worker_pool: int = 0
    """REPL workers kept pre-started (up, with no context yet) inside `async with RLM(...)`,
    refilled in the background, so a query does not wait for its worker's start-up. Each is
    used by one RLM node only and then killed, never reused; it is launched with the same
    `sandbox` tier and limits as one started on demand. Idle ones (about 18 MB resident each) do not
    count under `max_workers`. 0 (the default): workers start on demand, and nothing runs
    between queries. Outside `async with` (e.g. `completion()`), workers start on demand."""
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
    completion_order: bool = False
    """Tell the root model about `llm_batch_as_completed(prompts)`, which yields
    `(index, answer)` as each sub-call finishes (the REPL has it either way)."""
    compaction: bool = False
    """Summarise the root conversation when it reaches `compaction_threshold_pct` of the root
    model's context window; every turn (and each summary) stays in the REPL list `history`.
    The system prompt and the first user message are kept as they are, so the prefix a
    provider has cached still matches (docs/sessions.md)."""
    compaction_threshold_pct: float = 0.85
    """The share of the root model's context window (configured, else reported by the server,
    else 128,000 tokens as the official package assumes) at which the conversation is
    summarised."""
    tools: ToolSet = field(default_factory=ToolSet)
    """Custom tools of the root RLM (`RLM(custom_tools=...)`; built by `_tools.parse_tools`):
    host functions the code calls by name, and plain values set as variables."""
    sub_tools: ToolSet | None = None
    """Custom tools of child RLMs (`custom_sub_tools`); `None`: the same as `tools`."""
    max_errors: int | None = None
    """End the run (status "error") after this many turns in a row whose code failed
    (raised, wrote to stderr, or was stopped); `None`: no limit. The official `max_errors`."""
    official_prompt: OfficialPrompt | None = None
    """Use the official package's message formats with this system prompt (what
    `RLM(custom_system_prompt=...)` sets); `system_prompt` is then unused."""
    user_prologue: str | None = None
    """A user message after the first one (the context's metadata), before the model's
    first turn: task-specific tips, as the official `user_prologue`."""

    def __post_init__(self) -> None:
        # Whole numbers first: a "2" from an environment variable or 2.5 from arithmetic must
        # be named here, not fail later as a TypeError in a comparison or run 2.5 turns.
        for name in ("max_depth", "max_iterations", "output_limit_chars"):
            _whole_number(name, getattr(self, name))
        for name in ("max_pending_subcalls", "max_errors", "max_workers"):
            if getattr(self, name) is not None:
                _whole_number(name, getattr(self, name), or_none=True)
        if self.max_depth < 1:
            raise ConfigError(
                f"max_depth is {self.max_depth}; it must be at least 1 (1 = the paper's setting)"
            )
        if self.max_iterations < 1:
            raise ConfigError(f"max_iterations is {self.max_iterations}; it must be at least 1")
        if not 0 < self.compaction_threshold_pct <= 1:
            raise ConfigError(
                f"compaction_threshold_pct is {self.compaction_threshold_pct}; use a share of the context "
                "window above 0 and at most 1 (0.85 = summarise at 85%)"
            )
        if self.output_limit_chars < 100:
            raise ConfigError(f"output_limit_chars is {self.output_limit_chars}; use at least 100")
        if self.turn_timeout_s is not None and not self.turn_timeout_s > 0:
            raise ConfigError(f"turn_timeout_s is {self.turn_timeout_s}; use a number > 0, or None")
        if self.max_pending_subcalls is not None and self.max_pending_subcalls < 1:
            raise ConfigError(f"max_pending_subcalls is {self.max_pending_subcalls}; use >= 1, or None")
        if not isinstance(self.worker_pool, int) or self.worker_pool < 0:
            raise ConfigError(f"worker_pool must be an int >= 0 (0: no pool), not {self.worker_pool!r}")
        if self.max_errors is not None and self.max_errors < 1:
            raise ConfigError(f"max_errors is {self.max_errors}; use >= 1, or None for no limit")
        if self.max_workers is not None and self.max_workers < self.max_depth:
            raise ConfigError(
                f"max_workers is {self.max_workers} but max_depth is {self.max_depth}: a chain of nested "
                "RLMs needs one worker per level; use max_workers >= max_depth, or None"
            )

    def tools_for_depth(self, depth: int) -> ToolSet:
        """The root's tools at depth 0; a child RLM's below it."""
        if depth == 0 or self.sub_tools is None:
            return self.tools
        return self.sub_tools

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
        data = read_toml(path)
        data.pop("sim", None)  # the simulator's own table, read by the CLI that starts it
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> RLMConfig:
        """The tables of a config file: `[rlm]` holds `RLMConfig`'s plain fields, the others
        one nested setting each."""
        data = dict(data)
        kwargs: dict[str, Any] = dict(data.pop("rlm", {}))
        if "root" not in data:
            raise ConfigError(f"{source}: a [root] table with at least `model = ...` is required")

        def load(typ: type[T], value: Any, table: str) -> T:
            return load_dataclass(typ, value, table, source=source)

        kwargs["root"] = load(ModelConfig, data.pop("root"), "root")
        if "sub" in data:
            kwargs["sub"] = load(ModelConfig, data.pop("sub"), "sub")
        for key in ("others", "depth_models"):
            if key in data:
                kwargs[key] = tuple(load(ModelConfig, o, f"[{key}]") for o in data.pop(key))
        for key, typ in (("budget", BudgetLimits), ("governor", GovernorConfig), ("sandbox", SandboxConfig)):
            if key in data:
                kwargs[key] = load(typ, data.pop(key), key)
        if "journal" in data:
            journal = load(_JournalTable, data.pop("journal"), "journal")
            kwargs["journal_path"] = journal.path
            kwargs["journal_reuse_nondeterministic"] = journal.reuse_nondeterministic
        if data:
            raise ConfigError(
                f"{source}: unknown table(s) {sorted(data)}; known: root, sub, others, depth_models, rlm, "
                "budget, governor, sandbox, journal, sim"
            )
        return load(cls, kwargs, "rlm")


@dataclass(frozen=True, kw_only=True)
class _JournalTable:
    """The `[journal]` table, read into `RLMConfig.journal_path` and
    `journal_reuse_nondeterministic`."""

    path: str | None = None
    reuse_nondeterministic: bool = True


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file's tables; a missing or malformed file is a `ConfigError` naming it."""
    p = Path(path)
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist; see configs/ for examples") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None


Reader = Callable[[Mapping[str, Any]], Any]
"""Builds a value of one type from its table, where the table is not the type's fields
(the simulator's `PolicySpec`: a name plus free options)."""


def load_dataclass(
    cls: type[T],
    data: Any,
    table: str,
    *,
    source: str = "config",
    readers: Mapping[type, Reader] | None = None,
) -> T:
    """Build a frozen config dataclass, nested ones included, from a TOML table.

    The one TOML-to-dataclass loader (the simulator's configuration uses it too). `table`
    is the table's dotted name and `source` the file it came from: every error names both,
    and an unknown key is named with the valid keys. A dataclass-typed field reads a nested
    table, a `tuple` field a TOML array, a `float` field an integer; `None` passes for an
    optional field; a value that already has the field's type passes unchanged. Values are
    otherwise checked by the dataclass itself (`__post_init__`), not here."""
    return _load(cls, data, table, source, readers or {})


def _load(cls: type[T], data: Any, table: str, source: str, readers: Mapping[type, Reader]) -> T:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: [{table}] must be a table, got {type(data).__name__}")
    reader = readers.get(cls)
    if reader is not None:
        built: T = reader(data)
        return built
    assert dataclasses.is_dataclass(cls)
    names = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) in [{table}]: {unknown}; valid keys: {names}")
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: _convert(hints[name], value, f"{table}.{name}", source, readers) for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except (TypeError, ConfigError) as exc:
        # The dataclass's own check names the field; the file and table say where it is.
        raise ConfigError(f"{source}: [{table}]: {exc}") from None


def _convert(hint: Any, value: Any, table: str, source: str, readers: Mapping[type, Reader]) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            return value
        hint = args[0]
    if isinstance(hint, type) and (hint in readers or dataclasses.is_dataclass(hint)):
        return _load(hint, value, table, source, readers)
    if typing.get_origin(hint) is tuple and isinstance(value, list | tuple):
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
