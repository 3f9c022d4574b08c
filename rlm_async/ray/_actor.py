"""A query actor: an event loop of queries on one node, each with its REPL worker there.

The driver wraps `QueryActor` with `ray.remote` (an async actor, so `run_item` calls run
concurrently on its loop) and calls `run_item` for each query; the row comes back as the
call's result. Everything a sub-call needs is local: the rate-lease stock (`_pool.py`), the
actor's share of the batch budget (a `BatchBudget` whose cap is the lease the
`BudgetKeeper` granted it), and the journal (`_journal_store.py`). Round trips happen per
block of rate leases, per budget block, per shipped batch of journal rows, and once per
re-run query (its rows from the store): never per sub-call.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import tempfile
import time
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import anyio

from .._config import ModelConfig, RLMConfig
from .._governor import BudgetLimits, EndpointLimits, Governor
from .._result import RLMResult
from .._rlm import RLM
from ..batch import BatchBudget, BatchItem, BatchRow, CostEstimator, InputProblem, Lease
from ..exceptions import ConfigError, ContextTypeError, MissingAPIKey
from ..transport import OpenAITransport, Transport
from ._journal_store import CURRENT_QUERY, ReplicatedJournal
from ._pool import LeasedTransport, LeasePool, RateSource

__all__ = ["ActorSettings", "QueryActor"]

_DIMS = ("usd", "total_tokens")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ActorSettings:
    """What every query actor of a batch is told."""

    config: RLMConfig
    largest: Mapping[tuple[str, str, str], int]
    """(endpoint, model, dim) -> the largest rate grant its coordinator can make."""
    ttl_s: float = 2.0
    flush_s: float = 0.5
    """How often new journal rows are shipped to the store: calls a dead node paid for in
    its last `flush_s` are paid again."""
    capped: tuple[bool, bool] = (False, False)
    """Whether the batch caps dollars, total tokens."""


def unlimited_locally(config: RLMConfig) -> RLMConfig:
    """The config without per-process RPM/TPM buckets: in a cluster, the leases are the
    rate limit (a local bucket per actor would allow each actor the whole limit)."""

    def strip(m: ModelConfig | None) -> ModelConfig | None:
        if m is None:
            return None
        limits: EndpointLimits = dataclasses.replace(
            m.limits, requests_per_minute=None, tokens_per_minute=None
        )
        return dataclasses.replace(m, limits=limits)

    return dataclasses.replace(
        config,
        root=strip(config.root) or config.root,
        sub=strip(config.sub),
        depth_models=tuple(m for m in (strip(x) for x in config.depth_models) if m is not None),
        others=tuple(m for m in (strip(x) for x in config.others) if m is not None),
    )


class QueryActor:
    """One actor: `run_item` per query; `finish` once at the end."""

    def __init__(
        self, name: str, settings: ActorSettings, coordinators: Mapping[str, Any], keeper: Any, store: Any
    ) -> None:
        self.name = name
        self._settings = settings
        self._coordinators = dict(coordinators)
        self._keeper = keeper
        self._store = store
        self._rlm: RLM | None = None
        self._journal: ReplicatedJournal | None = None
        self._pools: dict[str, LeasePool] = {}
        self._budget: BatchBudget | None = None
        self._ready = anyio.Lock()
        self._changed: anyio.Event | None = None
        self._shipping = False
        self._last_flush = 0.0
        self._tmp = Path(tempfile.mkdtemp(prefix="rlm-ray-"))
        self.queries = 0
        self.seeded_rows = 0
        self.budget_trips = 0
        self.store_trips = 0
        self._started = time.monotonic()
        self._cpu0 = _cpu()

    # ------------------------------------------------------------------ setup
    async def _setup(self) -> RLM:
        async with self._ready:
            if self._rlm is not None:
                return self._rlm
            settings = self._settings
            config = unlimited_locally(settings.config)
            governor = Governor(config.governor)
            journal = cast(
                ReplicatedJournal,
                await ReplicatedJournal.open(self._tmp / "journal.sqlite", synchronous="normal"),
            )
            for endpoint, handle in self._coordinators.items():
                limited = {(m, d): n for (e, m, d), n in settings.largest.items() if e == endpoint}
                self._pools[endpoint] = LeasePool(_remote_take(handle), limited, ttl_s=settings.ttl_s)

            def transport(model: ModelConfig) -> Transport:
                inner = OpenAITransport(
                    model.base_url, api_key_env=model.api_key_env, timeout_s=model.timeout_s
                )
                pool = self._pools.get(model.base_url)
                return inner if pool is None else LeasedTransport(inner, pool, governor.estimator)

            capped_usd, capped_tokens = settings.capped
            limits = BudgetLimits(
                max_usd=0.0 if capped_usd else None, max_total_tokens=0 if capped_tokens else None
            )
            self._budget = BatchBudget(limits, CostEstimator(config, governor.prices))
            self._journal = journal
            self._changed = anyio.Event()
            self._rlm = RLM(config=config, governor=governor, transport=transport, journal=journal)
            return self._rlm

    # ------------------------------------------------------------------ one query
    async def run_item(self, item: BatchItem, resumed: bool) -> BatchRow:
        """Run one query and return its row (`not_started` when the batch budget is out)."""
        rlm = await self._setup()
        token = CURRENT_QUERY.set(item.key)
        try:
            if resumed:
                await self._seed(item.key)
            lease = await self._admit(item)
            if isinstance(lease, BatchRow):
                return lease
            row: BatchRow | None = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._ship_while_running)
                try:
                    row = await self._run(rlm, item, lease)
                finally:
                    tg.cancel_scope.cancel()
            assert row is not None
            return row
        finally:
            CURRENT_QUERY.reset(token)

    async def _seed(self, key: str) -> None:
        assert self._journal is not None
        self.store_trips += 1
        rows = await self._store.rows_for.remote(key)
        await self._journal.seed(rows)
        self.seeded_rows += len(rows)

    async def _run(self, rlm: RLM, item: BatchItem, lease: Lease) -> BatchRow:
        started = time.time()
        result: RLMResult | None = None
        try:
            context = item.load_context()
            result = await rlm.acompletion(context, item.query, ledger_parent=lease.ledger)
            self.queries += 1
            return dataclasses.replace(BatchRow.of_result(item.id, item.line, result, started), result=None)
        except (InputProblem, ContextTypeError) as exc:
            return BatchRow.invalid(item.id, item.line, exc)
        except (MissingAPIKey, ConfigError):
            raise  # misconfiguration: the driver stops the batch
        except Exception as exc:
            return BatchRow.failed(item.id, item.line, exc, started, time.time() - started)
        finally:
            if result is None:
                lease.close(learn=False)
            else:
                lease.close_after(result.status, journal_hits=result.total.journal_hits)
            # No flush here: once its row reaches the driver a query never re-runs, so its
            # rows need the store only while it runs (the shipper covers that).
            with anyio.CancelScope(shield=True):
                await self._after_query()

    # ------------------------------------------------------------------ budget
    async def _admit(self, item: BatchItem) -> Lease | BatchRow:
        budget = self._budget
        assert budget is not None and self._changed is not None
        prior = budget.estimator.prior(item.context_chars(), len(item.query))
        while True:
            if self._keeper is not None:
                await self._grow_for(budget, prior)
            lease = budget.admit(prior)
            if lease is not None:
                return lease
            if budget.running == 0:
                return BatchRow.not_started(item.id, item.line, budget.last_refusal)
            await self._changed.wait()  # a query of this actor finishing frees its share

    async def _grow_for(self, budget: BatchBudget, prior: Any) -> None:
        """Ask the keeper for what this query's estimate needs beyond the actor's lease,
        plus one more such query's worth (fewer round trips); then for the bare need."""
        estimate = budget.estimator.estimate(prior)
        need: dict[str, Decimal] = {}
        for d in _DIMS:
            cap = getattr(budget.ledger.limits, f"max_{d}")
            if cap is None:
                need[d] = Decimal(0)
                continue
            held = budget.held(d)
            need[d] = max(held + estimate[d] - Decimal(str(cap)), Decimal(0))
        if not any(need.values()):
            return
        for extra in (Decimal(1), Decimal(0)):
            usd = need["usd"] + (estimate["usd"] * extra if need["usd"] else Decimal(0))
            tokens = int(
                need["total_tokens"] + (estimate["total_tokens"] * extra if need["total_tokens"] else 0)
            )
            before = budget.ledger.limits
            self.budget_trips += 1
            held_usd, held_tokens = await self._keeper.grow.remote(self.name, str(usd), tokens)
            self._set_held(budget, Decimal(held_usd), held_tokens)
            if budget.ledger.limits != before:
                return

    def _set_held(self, budget: BatchBudget, usd: Decimal, tokens: int) -> None:
        capped_usd, capped_tokens = self._settings.capped
        budget.ledger.set_limits(
            BudgetLimits(
                max_usd=float(usd) if capped_usd else None, max_total_tokens=tokens if capped_tokens else None
            )
        )

    async def _after_query(self) -> None:
        assert self._changed is not None and self._budget is not None
        self._changed.set()
        self._changed = anyio.Event()
        if self._keeper is not None and self._budget.running == 0:
            await self._hand_back()

    async def _hand_back(self) -> None:
        """Idle: keep only what was committed (spent) and hand the rest back."""
        budget = self._budget
        assert budget is not None
        spent = budget.ledger.spent_usd + budget.ledger.reserved_usd
        tokens = budget.ledger.spent.total_tokens + budget.ledger.reserved.total_tokens
        self.budget_trips += 1
        await self._keeper.shrink.remote(
            self.name, str(spent), tokens, str(budget.ledger.spent_usd), budget.ledger.spent.total_tokens
        )
        self._set_held(budget, spent, tokens)

    # ------------------------------------------------------------------ journal shipping
    async def _ship_while_running(self) -> None:
        """Every running query keeps a shipper; together they ship at most once per
        `flush_s` for the whole actor."""
        while True:
            await anyio.sleep(self._settings.flush_s)
            if time.monotonic() - self._last_flush >= self._settings.flush_s:
                await self._flush()

    async def _flush(self) -> None:
        journal = self._journal
        if journal is None or self._shipping or not journal.outbox():
            return
        self._shipping = True
        self._last_flush = time.monotonic()
        try:
            self.store_trips += 1
            await journal.flush(lambda rows: self._store.put_many.remote(rows))
        finally:
            self._shipping = False

    # ------------------------------------------------------------------ the end
    async def finish(self) -> dict[str, Any]:
        """Ship what is left, hand back the unused budget, close; return this actor's figures."""
        await self._flush()
        if self._keeper is not None and self._budget is not None:
            await self._hand_back()
        if self._rlm is not None:
            await self._rlm.aclose()
        if self._journal is not None:
            await self._journal.aclose()
        wall = time.monotonic() - self._started
        return {
            "actor": self.name,
            "pid": os.getpid(),
            "node": _node_id(),
            "queries": self.queries,
            "seeded_rows": self.seeded_rows,
            "rate_round_trips": sum(p.round_trips for p in self._pools.values()),
            "rate_lapsed": _sum_dicts([p.lapsed() for p in self._pools.values()]),
            "budget_round_trips": self.budget_trips,
            "store_round_trips": self.store_trips,
            "wall_s": round(wall, 3),
            "cpu_s": round(_cpu() - self._cpu0, 3),
        }

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        return _node_id()


def _remote_take(handle: Any) -> RateSource:
    async def take(model: str, dim: str, want: int, at_least: int) -> tuple[int, float]:
        granted, waited = await handle.take.remote(model, dim, want, at_least)
        return int(granted), float(waited)

    return take


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _node_id() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


def _sum_dicts(ds: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out
