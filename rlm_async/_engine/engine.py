"""What queries share: configuration, transports (connection pools), the governor
(run-wide limits), the journal, and which prefix-cache buckets are warm. One per `RLM`
instance and event loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import anyio

from .. import _events
from .._cache import BatchPlan, CacheSettings, plan_batch
from .._config import ModelConfig, RLMConfig
from .._context import Context
from .._governor import BudgetLedger, Governor
from .._journal import Journal
from .._result import RLMResult
from .._servers import ServerProfile, ServerSettings, detect, resolve, window_from_error
from .._types import ModelRequest
from ..logger import RLMLogger
from ..sandbox import ReplSetup, Tier, Worker, WorkerPool, check_isolation, start_worker
from ..transport import Transport
from .query import Query
from .session import SessionState
from .slots import WorkerSlots
from .tools import ToolLimiters

__all__ = ["Engine"]

# Providers keep a cached prefix for minutes after its last use (OpenAI: 5-10 min idle).
_WARM_TTL_S = 300.0

T = TypeVar("T")


class Engine:
    def __init__(
        self,
        config: RLMConfig,
        *,
        transport_factory: Callable[[ModelConfig], Transport],
        governor: Governor,
        journal: Journal | None = None,
        clock: Callable[[], float] = time.monotonic,
        slots: WorkerSlots | None = None,
        pool: WorkerPool | None = None,
    ) -> None:
        self.config = config
        self.slots = slots if slots is not None else WorkerSlots(config.max_workers)
        """Live REPL workers: the process' shared slots (see `slots.py`)."""
        self.pool = pool
        """Pre-started workers (`RLMConfig.worker_pool`), when open for this event loop."""
        self.governor = governor
        self.journal = journal
        self.clock = clock
        self._transport_factory = transport_factory
        self._transports: dict[tuple[str, str | None], Transport] = {}
        self._warm_buckets: dict[str, float] = {}
        self._profiles: dict[str, ServerProfile] = {}
        self._settings: dict[ModelConfig, ServerSettings] = {}
        self._detecting = anyio.Lock()
        self.tool_limiters = ToolLimiters()
        """Per-tool concurrency caps (`Tool.max_concurrency`), shared by every query."""

    def with_config(self, config: RLMConfig) -> Engine:
        """An engine for `config` (the same models; other limits, depth or budget) that shares
        this one's transports, governor, journal and warm buckets: per-request limits in a
        service, without a connection pool per request."""
        derived = Engine(
            config,
            transport_factory=self._transport_factory,
            governor=self.governor,
            journal=self.journal,
            clock=self.clock,
            slots=self.slots,  # the process' cap on workers holds across per-request configs
            pool=self.pool,  # used only while the sandbox config is the pool's (start_worker)
        )
        derived._transports = self._transports
        derived._warm_buckets = self._warm_buckets
        # What each server is, found once per endpoint, holds for every per-request config.
        derived._profiles = self._profiles
        derived._settings = self._settings
        derived._detecting = self._detecting
        derived.tool_limiters = self.tool_limiters
        return derived

    def planner(
        self,
        prompts: Sequence[T],
        model: ModelConfig,
        to_requests: Callable[[Sequence[T], ModelConfig], list[ModelRequest]],
        cache: CacheSettings,
    ) -> Callable[[], BatchPlan]:
        """Plan a fan-out for prefix caching, with the cache buckets warm now: returned as a
        function that touches no shared state, so a large
        batch can be planned in a worker thread, off the event loop (`announce_plan` after)."""
        now = self.clock()
        warm = frozenset(b for b, t in self._warm_buckets.items() if now - t < _WARM_TTL_S)
        return lambda: plan_batch(to_requests(prompts, model), cache, already_warm=warm)

    def announce_plan(self, plan: BatchPlan) -> None:
        if len(plan.requests) > 1:
            _events.emit(_events.WarmupDecision, **plan.event_fields())

    def mark_warm(self, bucket: str) -> None:
        self._warm_buckets[bucket] = self.clock()

    async def server_settings(self, model: ModelConfig) -> ServerSettings:
        """What `model`'s server is and the settings that follow, found at its first use
        (one `server.detected` event per model) and kept for the engine's life."""
        settings = self._settings.get(model)
        if settings is not None:
            return settings
        async with self._detecting:  # the first fan-out must not probe a hundred times
            settings = self._settings.get(model)
            if settings is None:
                transport = self.transport_for(model)
                profile = self._profiles.get(transport.endpoint)
                if profile is None and model.server != "off":
                    profile = self._profiles[transport.endpoint] = await detect(transport)
                settings = resolve(model, profile or ServerProfile(endpoint=transport.endpoint))
                self._settings[model] = settings
                _events.emit(_events.ServerDetected, **settings.event_fields())
        return settings

    def learn_window(self, model: ModelConfig, message: str) -> None:
        """A server that reports no context window names it in its `context_length_exceeded`
        error: later prompts that cannot fit are refused before sending."""
        settings = self._settings.get(model)
        window = window_from_error(message)
        if settings is None or window is None or settings.context_window is not None:
            return
        self._settings[model] = settings = settings.with_window(window)
        _events.emit(_events.ServerDetected, **settings.event_fields())

    async def check_sandbox(self) -> Tier:
        """The tier this engine's workers run under, or `IsolationUnavailable`: checked
        before a node's first model call, so a sandbox that refuses costs no request (the
        worker itself starts beside that call). The pool checked its own when it opened."""
        pool = self.pool
        if pool is not None and pool.config == self.config.sandbox:
            return pool.plan.tier
        return await check_isolation(self.config.sandbox)

    async def start_worker(self, context: Context, setup: ReplSetup | None = None) -> Worker:
        """A REPL worker for one RLM node (or a session's root), `setup`'s tools and values
        loaded with its context: from the pool when one is open for this very sandbox
        configuration (same tier, same limits), else started now. Either way its process
        cap counts the slots' cap of workers that may be alive beside it (`peers`).
        `context` is trusted: the root's was checked at `RLM.acompletion`, a child's is the
        str prompt its parent's code passed."""
        pool = self.pool
        if pool is not None and pool.config == self.config.sandbox:
            return await pool.start_worker(context, setup, peers=self.slots.cap, checked=True)
        return await start_worker(context, self.config.sandbox, setup, peers=self.slots.cap, checked=True)

    def transport_for(self, model: ModelConfig) -> Transport:
        key = (model.base_url, model.api_key_env)
        transport = self._transports.get(key)
        if transport is None:
            transport = self._transports[key] = self._transport_factory(model)
        return transport

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            for transport in self._transports.values():
                await transport.aclose()
            self._transports.clear()

    async def run(
        self,
        context: Context,
        root_prompt: str | None,
        *,
        sinks: tuple[_events.EventSink, ...] = (),
        query_id: str = "q1",
        ledger_parent: BudgetLedger | None = None,
        session: SessionState | None = None,
        logger: RLMLogger | None = None,
    ) -> RLMResult:
        """One query. With `session`, its root runs in the session's worker (contexts and
        histories of earlier calls there); with `logger`, its root turns go into the
        official log."""
        query = Query(self, query_id=query_id, ledger_parent=ledger_parent, session=session, logger=logger)
        query.check_prices()
        kept: list[_events.Event] = []
        if self.config.keep_events:
            sinks = (*sinks, kept.append)
        with _events.sinks(*sinks, clock=self.clock), _events.bind(query_id=query_id):
            result = await query.run(context, root_prompt)
        result.events = kept
        if logger is not None:
            result.metadata = logger.get_trajectory()
        return result

    def open_session(self) -> SessionState:
        """A persistent session's state: its root worker starts at its first query."""
        config = self.config
        return SessionState(
            slots=self.slots,
            start=self.start_worker,
            below=config.max_depth - 1,
            compaction=config.compaction,
        )
