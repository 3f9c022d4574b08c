"""The running service: profiles (one `RLM` each, all on one governor), admission, tenants,
jobs, files, metrics, and the task group every query runs in.

`Service` is an async context manager: entering starts the in-process simulator when a
profile's base_url is "sim", opens the job store and the task group; `drain(grace_s)` stops
admitting, waits for in-flight queries up to the grace period and cancels the rest (their
workers are killed by the engine on the way out); leaving closes every `RLM` (connection
pools, journals) and the store.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import structlog

from .. import _events
from .._config import ModelConfig, RLMConfig
from .._context import Context
from .._governor import BudgetLimits, Governor
from .._rlm import RLM
from ..sandbox import WorkerPool
from ._admission import Admission, Tenants, TenantState
from ._config import ServeConfig
from ._errors import APIError
from ._files import FileStore
from ._gc_times import GcTimes
from ._jobs import Job, JobStore
from ._loop_lag import LoopLag
from ._metrics import Metrics
from ._openai import ContextSpec, RLMOptions

__all__ = ["QueryPlan", "Service"]

_log = structlog.get_logger("rlm_async.serve")
_SIM_BASE_URL = "sim"


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryPlan:
    """What to run: a profile, a context (inline or a file), a query, per-request limits."""

    model: str
    context: ContextSpec
    query: str
    max_depth: int | None
    budget: BudgetLimits


def _point_at(config: RLMConfig, base_url: str) -> RLMConfig:
    def fix(m: ModelConfig | None) -> ModelConfig | None:
        return (
            dataclasses.replace(m, base_url=base_url) if m is not None and m.base_url == _SIM_BASE_URL else m
        )

    root = fix(config.root)
    assert root is not None
    return dataclasses.replace(
        config,
        root=root,
        sub=fix(config.sub),
        depth_models=tuple(m for m in map(fix, config.depth_models) if m is not None),
        others=tuple(m for m in map(fix, config.others) if m is not None),
    )


class Service:
    def __init__(self, config: ServeConfig, *, event_sinks: tuple[_events.EventSink, ...] = ()) -> None:
        self.config = config
        self.metrics = Metrics()
        self.admission = Admission(max_running=config.max_running, max_queued=config.max_queued)
        self.rlms: dict[str, RLM] = {}
        self.jobs: dict[str, Job] = {}
        self.started_at = time.time()
        self.draining = False
        self.sandbox_tier: str | None = None
        self._extra_sinks = event_sinks
        self._stack = AsyncExitStack()
        self._tg: anyio.abc.TaskGroup | None = None
        self._governor: Governor | None = None
        self._tenants: Tenants | None = None
        self.store: JobStore | None = None
        self.files: FileStore | None = None
        self.sim_base_url: str | None = None
        self.notes: list[str] = []
        """What the operator should know at start (said once, beside the listening line)."""
        self.metrics.gauge("rlm_queries_in_flight", "Queries running now.", lambda: self.admission.running)
        self.metrics.gauge(
            "rlm_queue_depth", "Queries admitted and waiting for a slot.", lambda: self.admission.queued
        )

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Service:
        stack = self._stack
        data_dir = (
            Path(self.config.data_dir)
            if self.config.data_dir
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rlm-serve-")))
        )
        data_dir.mkdir(parents=True, exist_ok=True)
        self.files = FileStore(data_dir / "files", max_bytes=self.config.max_file_bytes)
        self.store = JobStore(data_dir / "jobs.sqlite")
        stack.callback(self.store.close)
        profiles = dict(self.config.profiles)
        if any(m.base_url == _SIM_BASE_URL for c in profiles.values() for m in c.all_models()):
            from ..sim import SimConfig, SimServer

            sim = await stack.enter_async_context(SimServer(SimConfig.from_dict(self.config.sim or {})))
            self.sim_base_url = sim.base_url
            profiles = {name: _point_at(c, sim.base_url) for name, c in profiles.items()}
        # One governor for every profile and tenant: limits per endpoint+model are shared by
        # all queries, and each tenant's ledger sits under its process ledger.
        first = next(iter(profiles.values()))
        self._governor = Governor(first.governor)
        self._tenants = Tenants(self._governor, self.config.tenant_limits)
        for name, cfg in profiles.items():
            cfg = dataclasses.replace(cfg, worker_pool=self.config.worker_pool)
            self._check_capacity(name, cfg)
            # Entered, not only closed: `async with` opens the profile's worker pool (its
            # first pre-start raises here when the sandbox cannot start, before serving).
            self.rlms[name] = await stack.enter_async_context(RLM(config=cfg, governor=self._governor))
        self.metrics.gauge(
            "rlm_worker_pool_idle",
            "REPL workers pre-started and waiting, over every profile.",
            lambda: sum(p.stats().idle for p in self._pools()),
        )
        self.metrics.gauge(
            "rlm_worker_pool_misses",
            "Queries that found the worker pool empty and started a worker on demand.",
            lambda: sum(p.stats().misses for p in self._pools()),
        )
        self._tg = await stack.enter_async_context(anyio.create_task_group())
        self.metrics.loop_lag = lag = LoopLag()
        self._tg.start_soon(lag.watch)
        self.metrics.gc_times = gc_times = GcTimes()
        gc_times.install()
        stack.callback(gc_times.remove)
        return self

    def _pools(self) -> list[WorkerPool]:
        return [p for p in (r.worker_pool for r in self.rlms.values()) if p is not None]

    def _check_capacity(self, name: str, cfg: RLMConfig) -> None:
        """Admitting more queries at once than the profile may have REPL workers makes the
        extra ones wait for a worker while they count as running: say so at start."""
        if cfg.max_workers is not None and cfg.max_workers < self.config.max_running:
            self.notes.append(
                f"profile {name!r}: at most {cfg.max_workers} REPL workers at once ([rlm] max_workers) "
                f"for max_running={self.config.max_running} queries, so queries beyond "
                f"{cfg.max_workers} wait for a worker; raise [rlm] max_workers to match"
            )

    async def __aexit__(self, *exc: object) -> None:
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        await self._stack.aclose()

    async def drain(self, grace_s: float) -> None:
        """Stop admitting; let in-flight queries finish for up to `grace_s`; cancel the rest
        (workers killed); wait until every query has ended and its record is written."""
        self.draining = True
        self.admission.closed = True
        with anyio.move_on_after(grace_s):
            for job in list(self.jobs.values()):
                await job.wait()
        for job in list(self.jobs.values()):
            job.cancel("the server shut down before the query finished")
        with anyio.move_on_after(30):
            for job in list(self.jobs.values()):
                await job.wait()

    # ------------------------------------------------------------------ profiles and limits
    def profile(self, model: str) -> str:
        if model in self.rlms:
            return model
        if len(self.rlms) == 1:
            return next(iter(self.rlms))
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {sorted(self.rlms)}",
            param="model",
            code="model_not_found",
        )

    def plan(self, model: str, context: ContextSpec, query: str, options: RLMOptions) -> QueryPlan:
        """Per-request limits, bounded by the server's: asking above a bound is a 400."""
        name = self.profile(model)
        cfg = self.rlms[name].config
        bounds = self.config.request_limits
        if options.max_depth is not None and options.max_depth > bounds.max_depth:
            raise APIError(
                400,
                f"rlm.max_depth {options.max_depth} is above this server's limit of {bounds.max_depth}",
                param="rlm.max_depth",
            )
        budget = cfg.budget
        changes: dict[str, Any] = {}
        for field_name, asked, bound in (
            ("max_usd", options.max_usd, bounds.max_usd),
            ("max_seconds", options.max_seconds, bounds.max_seconds),
        ):
            if asked is not None and bound is not None and asked > bound:
                raise APIError(
                    400,
                    f"rlm.{field_name} {asked:g} is above this server's limit of {bound:g}",
                    param=f"rlm.{field_name}",
                )
            current = getattr(budget, field_name)
            value = asked if asked is not None else current
            if bound is not None and (value is None or value > bound):
                value = bound
            if value != current:
                changes[field_name] = value
        return QueryPlan(
            model=name,
            context=context,
            query=query,
            max_depth=options.max_depth,
            budget=dataclasses.replace(budget, **changes) if changes else budget,
        )

    def tenant(self, name: str) -> TenantState:
        assert self._tenants is not None, "the service is not running"
        return self._tenants.get(name)

    # ------------------------------------------------------------------ queries
    def start(self, plan: QueryPlan, *, tenant: str, kind: str, progress: bool = True) -> Job:
        """Admit a query (or raise 429/503) and start it in the service's task group.
        `progress`: keep its progress feed (see `Job.progress`)."""
        assert self._tg is not None and self._tenants is not None, "the service is not running"
        state = self._tenants.get(tenant)
        try:
            self._tenants.check_rate(state)
            self._tenants.check_budget(state)
            self.admission.admit()
        except APIError as exc:
            if exc.status == 429:
                self.metrics.http_429_sent += 1
            raise
        job = Job(
            kind=kind, tenant=tenant, model=plan.model, progress=progress, max_events=self.config.max_events
        )
        self.jobs[job.id] = job
        self._tg.start_soon(self._run, job, plan, state)
        return job

    async def _context(self, spec: ContextSpec, tenant: str) -> Context:
        if spec.file_id is not None:
            assert self.files is not None
            return await self.files.load(spec.file_id, tenant=tenant, fmt=spec.file_format)
        assert spec.inline is not None
        return spec.inline

    async def _run(self, job: Job, plan: QueryPlan, tenant: TenantState) -> None:
        rlm = self.rlms[plan.model]
        sinks = (job.sink, self.metrics.sink(tenant.name), *self._extra_sinks)
        try:
            if job.kind == "job":
                await self._save(job)
            with anyio.CancelScope() as scope:
                job.scope = scope
                if job.cancel_requested:
                    scope.cancel()
                async with self.admission.slot():
                    job.set_running()
                    context = await self._context(plan.context, tenant.name)
                    result = await rlm.acompletion(
                        context,
                        plan.query,
                        event_sinks=sinks,
                        max_depth=plan.max_depth,
                        budget=plan.budget,
                        ledger_parent=tenant.ledger,
                    )
                    del context
                    job.finish(result)
            if not job.done:
                job.cancelled(job.error or "cancelled")
        except APIError as exc:  # the request's own fault, found once it ran (its file)
            job.fail(exc.message, refusal=exc)
        except Exception as exc:
            _log.exception("query failed", job_id=job.id)
            job.fail(f"{type(exc).__name__}: {exc}")
        finally:
            status = (job.result or {}).get("status") or job.state
            self.metrics.query_finished(str(status), tenant.name)
            if job.kind == "job":
                with anyio.CancelScope(shield=True):
                    await self._save(job)
                self._forget_old_jobs()
            else:
                self.jobs.pop(job.id, None)

    def _forget_old_jobs(self, keep: int = 1000) -> None:
        """Finished jobs stay in memory (their event feeds, for resuming) up to `keep`; older
        ones are read from the store."""
        finished = [j for j in self.jobs.values() if j.done]
        for old in finished[: max(0, len(finished) - keep)]:
            del self.jobs[old.id]

    async def _save(self, job: Job) -> None:
        assert self.store is not None
        await self.store.put(job)

    async def job_record(self, job_id: str, tenant: str) -> dict[str, Any]:
        job = self.jobs.get(job_id)
        if job is not None and job.kind == "job" and job.tenant == tenant:
            return job.to_dict()
        assert self.store is not None
        record = await self.store.get(job_id, tenant)
        if record is None:
            raise APIError(404, f"no job {job_id!r}", param="job_id")
        return record
