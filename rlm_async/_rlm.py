"""`RLM`: the official package's constructor and methods, on the async engine.

    from rlm_async import RLM
    rlm = RLM(backend="openai", backend_kwargs={"model_name": "gpt-5-mini"})
    print(rlm.completion(big_text, root_prompt="Who signed the treaty?").response)

Keyword arguments map onto the native `RLMConfig`; pass `config=RLMConfig(...)` to use it
directly. `completion` is synchronous (it runs its own event loop); `acompletion` is the
async form, and any number of `acompletion` calls may run concurrently in one event loop:
they share connection pools and the governor's run-wide limits, and nothing serialises them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from . import _events
from ._config import ModelConfig, RLMConfig
from ._context import Context, validate_context
from ._engine import Engine
from ._engine.slots import shared_slots
from ._governor import BudgetLedger, BudgetLimits, Governor, PriceTable
from ._journal import Journal
from ._result import RLMResult
from .exceptions import ConfigError
from .transport import OpenAITransport, Transport, require_api_key

if TYPE_CHECKING:
    from .batch import BatchControl, BatchItem, BatchRow, InvalidItem

__all__ = ["RLM"]

_SUPPORTED_BACKENDS = ("openai", "vllm", "sglang", "llamacpp", "ollama", "openai_compatible")

# Query ids are unique in the process, so traces of several RLM instances never collide.
_query_ids = itertools.count(1)

_governors: anyio.lowlevel.RunVar[dict[Any, Governor]] = anyio.lowlevel.RunVar("rlm_async_governors")


def _model_from_kwargs(
    backend: str, kwargs: dict[str, Any] | None, where: str
) -> tuple[ModelConfig, str | None]:
    if backend not in _SUPPORTED_BACKENDS:
        raise ConfigError(
            f"{where} backend {backend!r} is not supported; rlm_async speaks OpenAI-compatible chat "
            f"completions: use one of {', '.join(_SUPPORTED_BACKENDS)} with base_url pointing at the server"
        )
    kw = dict(kwargs or {})
    name = kw.pop("model_name", None) or kw.pop("model", None)
    if not name:
        raise ConfigError(f"{where}_kwargs needs 'model_name' (the model to call)")
    api_key = kw.pop("api_key", None)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(kw) - fields
    if unknown:
        raise ConfigError(
            f"{where}_kwargs has unknown key(s) {sorted(unknown)}; valid: model_name, api_key, "
            f"{', '.join(sorted(fields - {'model'}))}"
        )
    if backend != "openai" and "base_url" not in kw:
        raise ConfigError(f"{where} backend {backend!r} needs base_url in {where}_kwargs")
    if backend != "openai":
        kw.setdefault("api_key_env", None)
    return ModelConfig(model=name, **kw), api_key


def _refuse_unsupported(
    unsupported: dict[str, Any], *, persistent: bool, environment: str, depth: int
) -> None:
    """Official arguments rlm_async does not support (yet) are refused, naming what to do."""
    if unsupported:
        raise ConfigError(
            f"RLM() got unsupported argument(s) {sorted(unsupported)}; rlm_async supports the official "
            "package's core arguments plus config=, governor=, transport=, event_sinks="
        )
    if persistent:
        raise ConfigError("persistent=True is not supported yet; create one RLM per conversation turn")
    if environment not in ("local", "sandbox"):
        raise ConfigError(
            f"environment {environment!r} is not supported; rlm_async runs every REPL in its own "
            "sandboxed worker process ('local'); configure it with config=RLMConfig(sandbox=...)"
        )
    if depth != 0:
        raise ConfigError("depth is managed by the engine; leave it at 0 and set max_depth")


class RLM:
    """A Recursive Language Model: answers a query over a context of any size."""

    def __init__(
        self,
        backend: str = "openai",
        backend_kwargs: dict[str, Any] | None = None,
        environment: str = "local",
        environment_kwargs: dict[str, Any] | None = None,
        depth: int = 0,
        max_depth: int = 1,
        max_iterations: int = 30,
        max_budget: float | None = None,
        max_timeout: float | None = None,
        max_tokens: int | None = None,
        custom_system_prompt: str | None = None,
        other_backends: Sequence[str] | None = None,
        other_backend_kwargs: Sequence[dict[str, Any]] | None = None,
        verbose: bool = False,
        persistent: bool = False,
        on_subcall_start: Callable[[int, str, str], None] | None = None,
        on_subcall_complete: Callable[[int, str, float, str | None], None] | None = None,
        on_iteration_start: Callable[[int, int], None] | None = None,
        on_iteration_complete: Callable[[int, int, float], None] | None = None,
        *,
        config: RLMConfig | None = None,
        governor: Governor | None = None,
        transport: Transport | Callable[[ModelConfig], Transport] | None = None,
        event_sinks: Sequence[_events.EventSink] = (),
        journal: Journal | None = None,
        **unsupported: Any,
    ) -> None:
        _refuse_unsupported(unsupported, persistent=persistent, environment=environment, depth=depth)
        self._api_keys: dict[str, str] = {}
        if config is None:
            config = self._config_from_official(
                backend,
                backend_kwargs,
                other_backends,
                other_backend_kwargs,
                max_depth=max_depth,
                max_iterations=max_iterations,
                system_prompt=custom_system_prompt,
                budget=BudgetLimits(max_usd=max_budget, max_total_tokens=max_tokens, max_seconds=max_timeout),
            )
        elif backend_kwargs or other_backends:
            raise ConfigError("pass either config= or backend_kwargs/other_backends, not both")
        self.config = config
        self._governor = governor
        self._transport = transport
        self._journal = journal
        """An open journal to use instead of opening `config.journal_path` (the distributed
        runner's replicated one); the caller owns it and closes it."""
        self._sinks = list(event_sinks)
        hooks = (on_subcall_start, on_subcall_complete, on_iteration_start, on_iteration_complete)
        if any(hooks):
            from .hooks import OfficialCallbacks

            self._sinks.append(OfficialCallbacks(*hooks))
        self.verbose = verbose
        self._engines: dict[object, Engine] = {}
        self._refuse_misuse()

    def _config_from_official(
        self,
        backend: str,
        backend_kwargs: dict[str, Any] | None,
        other_backends: Sequence[str] | None,
        other_backend_kwargs: Sequence[dict[str, Any]] | None,
        *,
        max_depth: int,
        max_iterations: int,
        system_prompt: str | None,
        budget: BudgetLimits,
    ) -> RLMConfig:
        """The native configuration for the official constructor's arguments; API keys
        given inline are kept apart (`self._api_keys`), never in the config."""
        root, key = _model_from_kwargs(backend, backend_kwargs, "backend")
        if key:
            self._api_keys[root.model] = key
        others: list[ModelConfig] = []
        for i, b in enumerate(other_backends or ()):
            kwargs = (
                other_backend_kwargs[i] if other_backend_kwargs and i < len(other_backend_kwargs) else None
            )
            m, k = _model_from_kwargs(b, kwargs, "other_backend")
            others.append(m)
            if k:
                self._api_keys[m.model] = k
        return RLMConfig(
            root=root,
            # The official package uses its first other backend for sub-calls.
            sub=others[0] if others else None,
            others=tuple(others[1:]),
            max_depth=max_depth,
            max_iterations=max_iterations,
            system_prompt=system_prompt,
            budget=budget,
        )

    def _refuse_misuse(self) -> None:
        """Misuse is refused here, at construction, naming the fix, rather than at the first
        `completion()`: a model with no API key, a dollar cap over a model with no known price."""
        if self._transport is None:
            for model in self.config.all_models():
                require_api_key(model.base_url, self._api_keys.get(model.model), model.api_key_env)
        if self.config.budget.max_usd is not None:
            prices = self._governor.prices if self._governor is not None else PriceTable()
            models = self.config.all_models()
            unpriced = sorted({m.model for m in models if not prices.is_priced(m.model, m.prices)})
            if unpriced:
                raise ConfigError(
                    f"a dollar budget is set but no price is known for model(s) {unpriced}, so it could "
                    "not be enforced: give each a ModelPrice (ModelPrice.free() for a self-hosted model)"
                )

    # ------------------------------------------------------------------ engine plumbing
    def _make_transport(self, model: ModelConfig) -> Transport:
        if isinstance(self._transport, Transport):
            return self._transport
        if self._transport is not None:
            return self._transport(model)
        return OpenAITransport(
            model.base_url,
            api_key=self._api_keys.get(model.model),
            api_key_env=model.api_key_env,
            timeout_s=model.timeout_s,
        )

    async def _engine(self) -> Engine:
        # One engine per event loop: connection pools and limiters belong to a loop. Held by
        # this instance, so an RLM that is dropped without aclose() takes its pools with it.
        loop = anyio.lowlevel.current_token()
        engine = self._engines.get(loop)
        if engine is None:
            journal = self._journal or (
                await Journal.open(
                    self.config.journal_path,
                    reuse_nondeterministic=self.config.journal_reuse_nondeterministic,
                )
                if self.config.journal_path
                else None
            )
            engine = Engine(
                self.config,
                transport_factory=self._make_transport,
                governor=self._governor or _shared_governor(self.config),
                journal=journal,
                slots=shared_slots(self.config.max_workers),
            )
            for model in self.config.all_models():  # fail fast on a missing key, before any work
                engine.transport_for(model)
            self._engines[loop] = engine
        return engine

    async def aclose(self) -> None:
        """Close connection pools and the journal held for the current event loop."""
        engine = self._engines.pop(anyio.lowlevel.current_token(), None)
        if engine is not None:
            await engine.aclose()
            if engine.journal is not None and engine.journal is not self._journal:
                await engine.journal.aclose()

    async def __aenter__(self) -> RLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ the API
    async def acompletion(
        self,
        prompt: Context,
        root_prompt: str | None = None,
        *,
        event_sinks: Sequence[_events.EventSink] = (),
        max_depth: int | None = None,
        budget: BudgetLimits | None = None,
        ledger_parent: BudgetLedger | None = None,
    ) -> RLMResult:
        """Answer `root_prompt` over `prompt` (the context). Never raises for a run that
        ends early (budget, deadline, iterations): the result's `status` says why.

        `max_depth` and `budget` replace the configured ones for this query only (a service
        bounds them per request); `ledger_parent` puts the query's ledger under another
        ledger of this RLM's governor (a tenant's budget) instead of the process ledger."""
        context = validate_context(prompt)
        engine = await self._engine()
        changes: dict[str, Any] = {}
        if max_depth is not None and max_depth != self.config.max_depth:
            changes["max_depth"] = max_depth
        if budget is not None and budget != self.config.budget:
            changes["budget"] = budget
        if changes:
            engine = engine.with_config(dataclasses.replace(self.config, **changes))
        sinks = (*self._sinks, *event_sinks)
        query_id = f"q{next(_query_ids)}"
        if not self.verbose:
            return await engine.run(
                context, root_prompt, sinks=sinks, query_id=query_id, ledger_parent=ledger_parent
            )
        from ._progress import LiveProgress  # verbose=True: the official flag shows live progress

        with LiveProgress() as progress:
            return await engine.run(
                context, root_prompt, sinks=(*sinks, progress), query_id=query_id, ledger_parent=ledger_parent
            )

    async def abatch(
        self,
        items: Iterable[BatchItem | InvalidItem | Mapping[str, Any]],
        *,
        concurrency: int = 8,
        budget: BudgetLimits | None = None,
        control: BatchControl | None = None,
        event_sinks: Sequence[_events.EventSink] = (),
    ) -> AsyncGenerator[BatchRow, None]:
        """Answer many queries under one batch budget; yields one `BatchRow` per item as
        each finishes (see `rlm_async.batch` and docs/batch.md)."""
        from .batch import stream_rows

        engine = await self._engine()

        async def run_query(query: str, context: Context, parent: BudgetLedger) -> RLMResult:
            return await self.acompletion(context, query, event_sinks=event_sinks, ledger_parent=parent)

        async with stream_rows(
            run_query,
            items,
            config=self.config,
            governor=engine.governor,
            concurrency=concurrency,
            budget=budget,
            control=control,
        ) as rows:
            async for row in rows:
                yield row

    def batch(
        self,
        items: Iterable[BatchItem | InvalidItem | Mapping[str, Any]],
        *,
        concurrency: int = 8,
        budget: BudgetLimits | None = None,
    ) -> list[BatchRow]:
        """Synchronous `abatch`: every row, in the order the queries finished."""

        async def run() -> list[BatchRow]:
            try:
                return [row async for row in self.abatch(items, concurrency=concurrency, budget=budget)]
            finally:
                await self.aclose()

        return anyio.run(run)

    def completion(self, prompt: Context, root_prompt: str | None = None) -> RLMResult:
        """Synchronous `acompletion`: runs its own event loop, then closes what it opened."""

        async def run() -> RLMResult:
            try:
                return await self.acompletion(prompt, root_prompt)
            finally:
                await self.aclose()

        inside_loop = ConfigError(
            "RLM.completion() was called inside a running event loop; use `await rlm.acompletion(...)`"
        )
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # no asyncio loop in this thread: the normal case
        else:
            raise inside_loop
        try:
            return anyio.run(run)
        except RuntimeError as exc:
            # anyio says "Already running <library> in this thread" (e.g. under trio).
            if "already running" in str(exc).lower():
                raise inside_loop from None
            raise


def _shared_governor(config: RLMConfig) -> Governor:
    """The process' governor for this event loop, so every query shares run-wide limits."""
    try:
        governors = _governors.get()
    except LookupError:
        governors = {}
        _governors.set(governors)
    key = config.governor
    governor = governors.get(key)
    if governor is None:
        governor = governors[key] = Governor(config.governor)
    return governor
