"""The driver: a batch file in, an output file out, the queries run by actors on a Ray
cluster.

    summary, figures = await run_file_ray(config, Path("in.jsonl"), Path("out.jsonl"),
                                          address="auto", actors=4, concurrency=16)

The same input and output as the local batch (`read_items`, `OutputFile`: rows appended and
fsynced as queries finish, a rerun resumes). The driver pins the journal store, one
`Coordinator` per endpoint and the `BudgetKeeper` to its own node, starts the query actors,
and feeds each at most `concurrency` queries at once. An actor that dies (its node killed)
fails its calls: those queries go back to the front of the queue, marked to replay their
journaled calls, and a replacement actor is started wherever Ray finds room.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from .._config import RLMConfig
from .._governor import BudgetLimits
from .._types import Usage
from ..batch import (
    DEFAULT_MAX_CONTEXT_CHARS,
    BatchItem,
    BatchProgress,
    BatchRow,
    BatchSummary,
    InputProblem,
    InvalidItem,
    OutputFile,
    count_inputs,
    read_items,
)
from ..exceptions import ConfigError
from ._actor import ActorSettings, QueryActor
from ._coordinator import BudgetKeeper, Coordinator
from ._journal_store import JournalStore

__all__ = ["RayFigures", "run_file_ray"]


@dataclasses.dataclass(slots=True)
class RayFigures:
    """What the cluster did, beside the summary: for docs/scale.md and the tests."""

    actors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    coordinators: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    budget: dict[str, Any] | None = None
    store: dict[str, Any] | None = None
    actor_deaths: int = 0
    requeued: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def rate_limits(config: RLMConfig) -> dict[str, dict[str, tuple[float | None, int | None]]]:
    """Per endpoint (base URL), per model: the configured RPM and TPM (the cluster's)."""
    out: dict[str, dict[str, tuple[float | None, int | None]]] = {}
    for m in config.all_models():
        rpm, tpm = m.limits.requests_per_minute, m.limits.tokens_per_minute
        out.setdefault(m.base_url, {})
        if rpm is not None or tpm is not None:
            out[m.base_url][m.model] = (rpm, tpm)
    return out


async def run_file_ray(
    config: RLMConfig,
    input_path: Path,
    output_path: Path,
    *,
    actors: int = 2,
    concurrency: int = 8,
    budget: BudgetLimits | None = None,
    journal_path: Path | None = None,
    max_context_chars: int = DEFAULT_MAX_CONTEXT_CHARS,
    progress: BatchProgress | None = None,
    actor_options: Mapping[str, Any] | None = None,
    max_replacements: int | None = None,
    window_s: float = 10.0,
    ttl_s: float = 2.0,
    flush_s: float = 0.5,
) -> tuple[BatchSummary, RayFigures]:
    """Run every input of `input_path` without a final row in `output_path` on the
    connected Ray cluster (`ray.init` first). `actor_options` go to the query actors'
    `.options(...)` (default: no CPU reserved, spread over the nodes)."""
    try:
        import ray
    except ImportError:
        raise ConfigError('batches on a Ray cluster need Ray: pip install "rlm-async[ray]"') from None

    if actors < 1 or concurrency < 1:
        raise ConfigError(f"a Ray batch needs actors >= 1 and concurrency >= 1 (got {actors}, {concurrency})")
    if not ray.is_initialized():
        raise ConfigError("connect to a Ray cluster first: ray.init(address=...) (the CLI's --ray does)")
    budget = budget or BudgetLimits()
    output = await anyio.to_thread.run_sync(OutputFile.open, output_path)
    figures = RayFigures()
    try:
        total = await anyio.to_thread.run_sync(count_inputs, input_path)
        kept = list(output.rows.values())
        spent_before = (sum(r.cost_usd for r in kept), sum((r.usage for r in kept), Usage()).total_tokens)
        if progress is not None:
            progress.set_total(total, already_done=len(kept))
            progress.rows_only(budget.max_usd, spent_before=spent_before[0])

        # The head node: its loss ends the cluster anyway (it runs the GCS).
        pinned: dict[str, Any] = {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}
        journal_path = journal_path or output_path.with_name(output_path.name + ".journal")
        store: Any = (
            ray.remote(JournalStore).options(**pinned, max_concurrency=1).remote(str(journal_path.resolve()))
        )
        limits = rate_limits(config)
        coordinators: dict[str, Any] = {
            endpoint: ray.remote(Coordinator)
            .options(**pinned)
            .remote(endpoint, models, window_s=window_s, ttl_s=ttl_s)
            for endpoint, models in limits.items()
            if models
        }
        largest: dict[tuple[str, str, str], int] = {}
        for endpoint, handle in coordinators.items():
            for model, dim in await handle.limited.remote():
                largest[(endpoint, model, dim)] = await handle.largest.remote(model, dim)
        capped = (budget.max_usd is not None, budget.max_total_tokens is not None)
        keeper: Any = (
            ray.remote(BudgetKeeper)
            .options(**pinned)
            .remote(budget.max_usd, budget.max_total_tokens, spent_before)
            if any(capped)
            else None
        )
        settings = ActorSettings(config=config, largest=largest, ttl_s=ttl_s, flush_s=flush_s, capped=capped)
        options = {"num_cpus": 0, "scheduling_strategy": "SPREAD", **(actor_options or {})}
        remote_actor = ray.remote(QueryActor).options(
            max_concurrency=concurrency + 4, max_restarts=0, **options
        )
        in_store = set(await store.queries.remote())

        feed = _Feed(
            read_items(input_path, max_context_chars=max_context_chars),
            skip=output.done,
            replay=in_store,
        )
        serial = iter(range(1, 1_000_000))
        live: dict[str, Any] = {}
        replacements_left = max_replacements if max_replacements is not None else actors * 2

        not_started: list[BatchRow] = []

        async def deliver(row: BatchRow) -> None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(output.append, row)
            if not row.final:
                not_started.append(row)
            if progress is not None:
                progress.row_done(row)

        async def drive(tg: anyio.abc.TaskGroup, name: str) -> None:
            handle = live[name]
            for _ in range(concurrency):
                tg.start_soon(feed_actor, tg, name, handle)

        def start_actor(tg: anyio.abc.TaskGroup) -> None:
            name = f"actor-{next(serial)}"
            live[name] = remote_actor.remote(name, settings, coordinators, keeper, store)
            tg.start_soon(drive, tg, name)

        async def feed_actor(tg: anyio.abc.TaskGroup, name: str, handle: Any) -> None:
            nonlocal replacements_left
            while name in live:
                got = await feed.next()
                if got is None:
                    return
                item, replay = got
                if isinstance(item, InvalidItem):
                    await deliver(BatchRow.invalid(item.id, item.line, item.problem))
                    feed.done()
                    continue
                try:
                    inline = await anyio.to_thread.run_sync(_inline, item)
                except InputProblem as exc:
                    await deliver(BatchRow.invalid(item.id, item.line, exc))
                    feed.done()
                    continue
                if progress is not None:
                    progress.query_started(item)
                try:
                    row = await handle.run_item.remote(inline, replay)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError):
                    feed.requeue(item)
                    figures.requeued += 1
                    if progress is not None:
                        progress.query_requeued()
                    if live.pop(name, None) is not None:
                        figures.actor_deaths += 1
                        if keeper is not None:
                            await keeper.died.remote(name)
                        if replacements_left > 0:
                            replacements_left -= 1
                            start_actor(tg)
                    return
                await deliver(row)
                feed.done()

        async with anyio.create_task_group() as tg:
            for _ in range(actors):
                start_actor(tg)

        for handle in list(live.values()):
            figures.actors.append(await handle.finish.remote())
            ray.kill(handle)
        figures.coordinators = [await h.stats.remote() for h in coordinators.values()]
        figures.budget = None if keeper is None else await keeper.stats.remote()
        figures.store = await store.stats.remote()
        if feed.unfinished():
            raise RuntimeError(
                f"queries are left with no actor to run them ({figures.actor_deaths} actors died, no "
                "replacement left); rerun the same command to finish them"
            )
        return (
            BatchSummary.of_rows(
                [*output.rows.values(), *not_started],
                cap_usd=budget.max_usd,
                cap_tokens=budget.max_total_tokens,
                expected=total,
            ),
            figures,
        )
    finally:
        output.close()


def _inline(item: BatchItem) -> BatchItem:
    """The item with its context read here: actors on other nodes need not see the file."""
    if item.context_file is None:
        return item
    return dataclasses.replace(item, context=item.load_context(), context_file=None)


class _Feed:
    """Items in input order, re-run ones first; knows when every item has a row."""

    def __init__(self, items: Iterator[BatchItem | InvalidItem], *, skip: Any, replay: set[str]) -> None:
        self._items = items
        self._skip = skip
        self._replay = replay
        self._again: deque[BatchItem] = deque()
        self._exhausted = False
        self._out = 0
        self._changed = anyio.Event()

    def _poke(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def next(self) -> tuple[BatchItem | InvalidItem, bool] | None:
        while True:
            if self._again:
                self._out += 1
                return self._again.popleft(), True
            if not self._exhausted:
                for item in self._items:
                    if self._skip(item.key):
                        continue
                    self._out += 1
                    return item, item.key in self._replay
                self._exhausted = True
            if self._out == 0:
                self._poke()  # wake the others: nothing is left anywhere
                return None
            await self._changed.wait()  # a running item may yet come back to be re-run

    def done(self) -> None:
        self._out -= 1
        self._poke()

    def requeue(self, item: BatchItem) -> None:
        self._out -= 1
        self._again.append(item)
        self._poke()

    def unfinished(self) -> bool:
        """Whether items are left without a row (every actor gone before the end)."""
        return bool(self._again) or not self._exhausted
