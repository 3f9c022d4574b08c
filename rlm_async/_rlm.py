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
import functools
import itertools
import json
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

from . import _events, _loop
from ._config import ModelConfig, RLMConfig
from ._context import Context, validate_context
from ._engine import Engine
from ._engine.session import SessionState
from ._engine.slots import shared_slots
from ._governor import BudgetLedger, BudgetLimits, Governor, PriceTable
from ._journal import Journal
from ._official_prompts import OfficialPrompt
from ._result import RLMResult
from ._session import Session
from ._tools import parse_tools
from .exceptions import ConfigError, ContextTypeError
from .logger import RLMLogger, RLMMetadata
from .sandbox import SandboxConfig, WorkerPool, check_isolation
from .transport import OpenAITransport, Transport, require_api_key

if TYPE_CHECKING:
    from .batch import BatchControl, BatchItem, BatchRow, InvalidItem

__all__ = ["RLM"]

T = TypeVar("T")

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


def _refuse_unsupported(unsupported: dict[str, Any], *, depth: int) -> None:
    """Official arguments rlm_async does not support (yet) are refused, naming what to do."""
    if unsupported:
        raise ConfigError(
            f"RLM() got unsupported argument(s) {sorted(unsupported)}; rlm_async supports the official "
            "package's core arguments plus config=, governor=, transport=, event_sinks="
        )
    if depth != 0:
        raise ConfigError("depth is managed by the engine; leave it at 0 and set max_depth")


# The official package's environments, and the sandbox tier of ours each one becomes.
_ENVIRONMENT_TIERS: dict[str, str | None] = {
    "local": None,  # as configured ("auto": the strongest tier that works here)
    "sandbox": None,
    "ipython": None,  # a Python REPL that keeps its state, as ours does (no IPython magics)
    "docker": "bubblewrap",  # an isolated container, in ours: namespaces, no daemon needed
}
_REMOTE_ENVIRONMENTS = ("modal", "e2b", "daytona", "prime")


def _sandbox_for(environment: str, sandbox: SandboxConfig) -> SandboxConfig:
    """The official `environment=`: mapped onto one of our sandbox tiers, or refused."""
    if environment in _REMOTE_ENVIRONMENTS:
        raise ConfigError(
            f"environment {environment!r} (a remote cloud sandbox) is not supported: rlm_async runs every "
            "REPL in a sandboxed worker process on this machine (bubblewrap or landlock); use "
            "environment='local' (the strongest tier that works here) or 'docker' (the bubblewrap tier)"
        )
    if environment not in _ENVIRONMENT_TIERS:
        raise ConfigError(
            f"environment {environment!r} is unknown; use 'local' (or 'docker', 'ipython'); rlm_async runs "
            "every REPL in its own sandboxed worker process, configured by RLMConfig(sandbox=...)"
        )
    tier = _ENVIRONMENT_TIERS[environment]
    return sandbox if tier is None else dataclasses.replace(sandbox, isolation=tier)  # type: ignore[arg-type]


def _with_sampling(model: ModelConfig, args: dict[str, Any], where: str) -> ModelConfig:
    """The official `sampling_args` on one model: `temperature` and `max_tokens` (or
    `max_completion_tokens`) are the model's own settings; `extra_body` is merged in, as the
    official client merges it; `None` values are dropped, as it drops them; the rest is sent
    as it is."""
    if not isinstance(args, dict):
        raise ConfigError(f"{where} must be a dict of request fields, not {type(args).__name__}")
    rest = {k: v for k, v in args.items() if v is not None}
    extra = rest.pop("extra_body", None) or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"{where}['extra_body'] must be a dict, not {type(extra).__name__}")
    changes: dict[str, Any] = {}
    for key in ("max_tokens", "max_completion_tokens"):
        if key in rest:
            changes["max_tokens"] = rest.pop(key)
    if "temperature" in rest:
        changes["temperature"] = rest.pop("temperature")
    sampling = {**model.sampling, **rest, **extra}
    try:
        json.dumps(sampling, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where} must hold JSON data (it is sent in each request): {exc}") from None
    return dataclasses.replace(model, sampling=sampling, **changes)


def _with_subcall_concurrency(config: RLMConfig, limit: int) -> RLMConfig:
    """The official `max_concurrent_subcalls` as the governor's concurrency cap of the sub
    model's endpoint+model. The governor's limits are global: this caps that endpoint+model
    for every query in the process (and the root's calls too when the root is that model)."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ConfigError(f"max_concurrent_subcalls is {limit!r}; use an int >= 1")
    target = config.model_for_depth(1)

    def capped(m: ModelConfig) -> ModelConfig:
        if (m.base_url, m.model) != (target.base_url, target.model):
            return m
        return dataclasses.replace(m, limits=dataclasses.replace(m.limits, max_concurrency=limit))

    return dataclasses.replace(
        config,
        root=capped(config.root),
        sub=None if config.sub is None else capped(config.sub),
        depth_models=tuple(map(capped, config.depth_models)),
        others=tuple(map(capped, config.others)),
    )


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
        logger: RLMLogger | None = None,
        compaction: bool = False,
        compaction_threshold_pct: float | None = None,
        max_errors: int | None = None,
        custom_tools: Mapping[str, Any] | None = None,
        custom_sub_tools: Mapping[str, Any] | None = None,
        max_concurrent_subcalls: int | None = None,
        sampling_args: dict[str, Any] | None = None,
        sub_sampling_args: dict[str, Any] | None = None,
        orchestrator: bool = True,
        user_prologue: str | None = None,
        config: RLMConfig | None = None,
        governor: Governor | None = None,
        transport: Transport | Callable[[ModelConfig], Transport] | None = None,
        event_sinks: Sequence[_events.EventSink] = (),
        journal: Journal | None = None,
        **unsupported: Any,
    ) -> None:
        _refuse_unsupported(unsupported, depth=depth)
        self._api_keys: dict[str, str] = {}
        if config is None:
            config = self._config_from_official(
                backend,
                backend_kwargs,
                other_backends,
                other_backend_kwargs,
                max_depth=max_depth,
                max_iterations=max_iterations,
                budget=BudgetLimits(max_usd=max_budget, max_total_tokens=max_tokens, max_seconds=max_timeout),
            )
        elif backend_kwargs or other_backends:
            raise ConfigError("pass either config= or backend_kwargs/other_backends, not both")
        config = self._official_extras(
            config,
            environment=environment,
            max_errors=max_errors,
            custom_system_prompt=custom_system_prompt,
            custom_tools=custom_tools,
            custom_sub_tools=custom_sub_tools,
            max_concurrent_subcalls=max_concurrent_subcalls,
            sampling_args=sampling_args,
            sub_sampling_args=sub_sampling_args,
            orchestrator=orchestrator,
            user_prologue=user_prologue,
            compaction=compaction,
            compaction_threshold_pct=compaction_threshold_pct,
        )
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
        self.persistent = persistent
        """One REPL across `completion` calls (the official flag): see `session()`."""
        self.logger = logger
        self._engines: dict[object, Engine] = {}
        self._pools: dict[object, tuple[WorkerPool, int]] = {}
        """The worker pool open for an event loop, and how many `async with` hold it."""
        self._sessions: dict[object, Session] = {}
        self._portal: _Portal | None = None
        self._refuse_misuse()
        if logger is not None:  # as officially: the run's metadata first, at construction
            logger.log_metadata(
                _log_metadata(
                    backend, backend_kwargs, environment, environment_kwargs, other_backends, self.config
                )
            )

    def _config_from_official(
        self,
        backend: str,
        backend_kwargs: dict[str, Any] | None,
        other_backends: Sequence[str] | None,
        other_backend_kwargs: Sequence[dict[str, Any]] | None,
        *,
        max_depth: int,
        max_iterations: int,
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
            budget=budget,
        )

    @staticmethod
    def _official_extras(
        config: RLMConfig,
        *,
        environment: str,
        max_errors: int | None,
        custom_system_prompt: str | None,
        custom_tools: Mapping[str, Any] | None,
        custom_sub_tools: Mapping[str, Any] | None,
        max_concurrent_subcalls: int | None,
        sampling_args: dict[str, Any] | None,
        sub_sampling_args: dict[str, Any] | None,
        orchestrator: bool,
        user_prologue: str | None,
        compaction: bool,
        compaction_threshold_pct: float | None,
    ) -> RLMConfig:
        """The official arguments beyond models and budgets, onto the native config (built
        from the official arguments or given as `config=`): each given one replaces its field."""
        changes: dict[str, Any] = {"sandbox": _sandbox_for(environment, config.sandbox)}
        if max_errors is not None:
            changes["max_errors"] = max_errors
        if custom_system_prompt:
            # A user's own prompt text is used the official package's way, message formats
            # included, so a model trained on its trajectories sees what it was trained on.
            changes["official_prompt"] = OfficialPrompt(
                template=custom_system_prompt, orchestrator=orchestrator
            )
        if custom_tools is not None:
            changes["tools"] = parse_tools(custom_tools, "custom_tools")
        if custom_sub_tools is not None:
            changes["sub_tools"] = parse_tools(custom_sub_tools, "custom_sub_tools")
        if user_prologue is not None:
            changes["user_prologue"] = user_prologue
        if compaction:
            changes["compaction"] = True
        if compaction_threshold_pct is not None:
            changes["compaction_threshold_pct"] = compaction_threshold_pct
        if sampling_args is not None:
            changes["root"] = _with_sampling(config.root, sampling_args, "sampling_args")
        if sub_sampling_args is not None:
            # As the official package: without another backend, sub-calls get a copy of the
            # root model (with the root's sampling_args) carrying these.
            sub = config.sub or changes.get("root", config.root)
            changes["sub"] = _with_sampling(sub, sub_sampling_args, "sub_sampling_args")
        config = dataclasses.replace(config, **changes)
        if max_concurrent_subcalls is not None:
            config = _with_subcall_concurrency(config, max_concurrent_subcalls)
        return config

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
                pool=self._pools[loop][0] if loop in self._pools else None,
            )
            for model in self.config.all_models():  # fail fast on a missing key, before any work
                engine.transport_for(model)
            self._engines[loop] = engine
        return engine

    async def aclose(self) -> None:
        """Close the persistent session (its worker), connection pools and the journal held
        for the current event loop."""
        loop = anyio.lowlevel.current_token()
        session = self._sessions.pop(loop, None)
        if session is not None:
            await session.aclose()
        engine = self._engines.pop(loop, None)
        if engine is not None:
            await engine.aclose()
            if engine.journal is not None and engine.journal is not self._journal:
                await engine.journal.aclose()

    @property
    def worker_pool(self) -> WorkerPool | None:
        """The pool of pre-started workers open for the current event loop (inside `async
        with` and `RLMConfig.worker_pool` > 0), else None."""
        held = self._pools.get(anyio.lowlevel.current_token())
        return held[0] if held is not None else None

    async def __aenter__(self) -> RLM:
        """Open the worker pool (`RLMConfig.worker_pool` > 0) for this event loop: its first
        worker starts now, so a sandbox that cannot start raises here, not at a query.
        Without a pool, the sandbox's isolation is checked now (`IsolationUnavailable`
        here, not at a query); its probes run once per process, so a query's own check
        before its first call is then free (its worker starts beside that call)."""
        if self.config.worker_pool == 0:
            await check_isolation(self.config.sandbox)
        if self.config.worker_pool > 0:
            loop = anyio.lowlevel.current_token()
            held = self._pools.get(loop)
            if held is not None:  # nested: the outer `async with` keeps the pool
                self._pools[loop] = (held[0], held[1] + 1)
                return self
            # peers: the engine's slots cap, as its on-demand starts pass (`Engine.start_worker`).
            pool = WorkerPool(self.config.sandbox, self.config.worker_pool, peers=self.config.max_workers)
            await pool.__aenter__()
            self._pools[loop] = (pool, 1)
            engine = self._engines.get(loop)
            if engine is not None:
                engine.pool = pool
        return self

    async def __aexit__(self, *exc: object) -> None:
        loop = anyio.lowlevel.current_token()
        held = self._pools.get(loop)
        if held is not None and held[1] > 1:
            self._pools[loop] = (held[0], held[1] - 1)
            held = None
        try:
            await self.aclose()
        finally:
            if held is not None:
                del self._pools[loop]
                await held[0].__aexit__(*exc)

    # ------------------------------------------------------------------ the API
    def session(self) -> Session:
        """A persistent REPL across calls: `async with rlm.session() as s: await
        s.completion(...)`. Leaving the block kills its worker (see `rlm_async.Session`)."""
        return Session(self._run, self._open_session)

    async def _open_session(self) -> SessionState:
        return (await self._engine()).open_session()

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
        ledger of this RLM's governor (a tenant's budget) instead of the process ledger.
        With `persistent=True`, calls go to this event loop's session, one at a time."""
        if root_prompt is not None and not isinstance(root_prompt, str):
            raise ContextTypeError(
                f"root_prompt (the query) is a {type(root_prompt).__name__}; pass a str, or None"
            )
        run = self._run
        if self.persistent:
            loop = anyio.lowlevel.current_token()
            session = self._sessions.get(loop)
            if session is None:
                session = self._sessions[loop] = self.session()
            run = session.completion
        return await run(
            prompt,
            root_prompt,
            event_sinks=event_sinks,
            max_depth=max_depth,
            budget=budget,
            ledger_parent=ledger_parent,
        )

    async def _run(
        self,
        prompt: Context,
        root_prompt: str | None,
        *,
        event_sinks: Sequence[_events.EventSink] = (),
        max_depth: int | None = None,
        budget: BudgetLimits | None = None,
        ledger_parent: BudgetLedger | None = None,
        session: SessionState | None = None,
    ) -> RLMResult:
        context = validate_context(prompt)
        engine = await self._engine()
        changes: dict[str, Any] = {}
        if max_depth is not None and max_depth != self.config.max_depth:
            changes["max_depth"] = max_depth
        if budget is not None and budget != self.config.budget:
            changes["budget"] = budget
        if changes:
            engine = engine.with_config(dataclasses.replace(self.config, **changes))
        if self.logger is not None:
            self.logger.clear_iterations()  # as officially: a trajectory per completion
        sinks = (*self._sinks, *event_sinks)
        query_id = f"q{next(_query_ids)}"
        run = functools.partial(
            engine.run,
            context,
            root_prompt,
            query_id=query_id,
            ledger_parent=ledger_parent,
            session=session,
            logger=self.logger,
        )
        if not self.verbose:
            return await run(sinks=sinks)
        from ._progress import LiveProgress  # verbose=True: the official flag shows live progress

        with LiveProgress() as progress:
            return await run(sinks=(*sinks, progress))

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

        return _loop.run(run)

    def completion(self, prompt: Context, root_prompt: str | None = None) -> RLMResult:
        """Synchronous `acompletion`: runs its own event loop, then closes what it opened.
        With `persistent=True` the loop is a background thread's, kept (with the session's
        worker) until `close()`."""

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
        if self.persistent:
            if self._portal is None:
                self._portal = _Portal()
            return self._portal.call(self.acompletion, prompt, root_prompt)
        try:
            return _loop.run(run)
        except RuntimeError as exc:
            # anyio says "Already running <library> in this thread" (e.g. under trio).
            if "already running" in str(exc).lower():
                raise inside_loop from None
            raise

    def close(self) -> None:
        """End what synchronous `completion` calls kept open (with `persistent=True`, the
        session's worker and its event loop's thread). Idempotent; the official method."""
        portal, self._portal = self._portal, None
        if portal is not None:
            portal.close(self.aclose)

    def __enter__(self) -> RLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Portal:
    """An event loop in a daemon thread of its own, for synchronous calls of a persistent
    RLM: its worker (a process the loop owns) outlives each call, so the loop must too.
    A daemon, so that a program that never calls `close()` still exits; its workers then
    die with the process (each tier's worker dies with its parent)."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._thread = threading.Thread(
            target=_loop.run, args=(self._serve,), name="rlm-async-session", daemon=True
        )
        self._thread.start()
        self._ready.wait()

    async def _serve(self) -> None:
        async with anyio.from_thread.BlockingPortal() as portal:
            self._portal = portal
            self._ready.set()
            await portal.sleep_until_stopped()

    def call(self, func: Callable[..., Awaitable[T]], *args: Any) -> T:
        assert self._portal is not None
        return self._portal.call(func, *args)

    def close(self, aclose: Callable[[], Awaitable[None]]) -> None:
        assert self._portal is not None
        try:
            self._portal.call(aclose)
        finally:
            self._portal.call(self._portal.stop)
            self._thread.join()


def _log_metadata(
    backend: str,
    backend_kwargs: dict[str, Any] | None,
    environment: str,
    environment_kwargs: dict[str, Any] | None,
    other_backends: Sequence[str] | None,
    config: RLMConfig,
) -> RLMMetadata:
    """The official log's first line; keys naming an API key are left out, as officially."""

    def public(kwargs: dict[str, Any] | None) -> dict[str, Any]:
        return {k: v for k, v in (kwargs or {}).items() if not ("api" in k.lower() and "key" in k.lower())}

    return RLMMetadata(
        root_model=config.root.model,
        max_depth=config.max_depth,
        max_iterations=config.max_iterations,
        backend=backend,
        backend_kwargs=public(backend_kwargs),
        environment_type=environment,
        environment_kwargs=public(environment_kwargs),
        other_backends=list(other_backends) if other_backends else None,
    )


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
