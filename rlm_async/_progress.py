"""Live progress on a terminal: the RLM tree as it grows, tokens, dollars against the budget.

Two halves, so that rendering never runs inside the engine's loop:

- `ProgressState` is the event sink. It folds each event into a few counters under a
  lock (microseconds, whatever the event rate) and never draws anything.
- `LiveProgress` owns a `rich.live.Live` whose own refresh thread asks for a snapshot a
  few times a second and draws it. The cost of drawing depends on the refresh rate and
  the number of rows shown (capped), not on how many events arrived.

    with LiveProgress(quiet=args.quiet) as progress:
        result = await rlm.acompletion(context, root_prompt, event_sinks=[progress])

It draws nothing when `quiet=True` or when its console is not a terminal (output piped to
a file, CI logs): it then costs only the counting. It renders through a rich `Console`
(stderr by default, so stdout stays clean for the answer) and never prints.

One row per RLM node (the root and every child RLM); plain sub-calls are counted on their
parent's row (in flight / done / failed), because a run makes thousands of them. It sums
whatever events it is given: use one display per query.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from ._events import (
    CallFinish,
    CallRetry,
    CallStart,
    CellFinish,
    CellStart,
    Event,
    IterationStart,
    NodeFinish,
    NodeStart,
    QueryFinish,
    QueryStart,
)
from ._types import Usage

__all__ = ["LiveProgress", "ProgressSnapshot", "ProgressState", "RowSnapshot", "render_snapshot"]


class _Row:
    """Mutable counters of one RLM node; only touched under ProgressState's lock."""

    __slots__ = (
        "cell_running",
        "cost_usd",
        "depth",
        "finished",
        "iteration",
        "label",
        "model",
        "node_id",
        "order",
        "own_done",
        "own_in_flight",
        "parent_id",
        "started",
        "status",
        "sub_done",
        "sub_failed",
        "sub_in_flight",
    )

    def __init__(self, node_id: str, order: int, now: float) -> None:
        self.node_id = node_id
        self.parent_id: str | None = None
        self.depth = 0
        self.model: str | None = None
        self.label: str | None = None
        self.status = "running"
        self.iteration = 0
        self.cell_running = False
        self.own_in_flight = 0
        self.own_done = 0
        self.sub_in_flight = 0
        self.sub_done = 0
        self.sub_failed = 0
        self.cost_usd = 0.0
        self.started = now
        self.finished: float | None = None
        self.order = order


@dataclass(frozen=True, slots=True)
class RowSnapshot:
    node_id: str
    parent_id: str | None
    depth: int
    model: str | None
    label: str | None
    status: str
    iteration: int
    cell_running: bool
    own_in_flight: int
    own_done: int
    sub_in_flight: int
    sub_done: int
    sub_failed: int
    cost_usd: float
    elapsed_s: float


@dataclass(frozen=True, slots=True)
class ProgressSnapshot:
    query_id: str | None
    status: str
    """"waiting" before query.start, "running", then query.finish's status."""
    elapsed_s: float
    calls: int
    """Calls started, those in flight included."""
    in_flight: int
    retries: int
    totals: Usage
    """The finished calls, counted as `RLMResult.total` counts them."""
    budget_usd: float | None
    rows: tuple[RowSnapshot, ...]
    """At most `max_rows` RLM nodes, parents before children: the roots, then the running
    ones, then the most recently finished."""
    hidden_rows: int


class ProgressState:
    """The sink: counts calls, tokens and dollars per RLM node. Never renders.

    Thread-safe: the engine calls it on the event loop's thread while the display reads
    snapshots from its refresh thread.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._rows: dict[str, _Row] = {}
        self._owner: dict[str, str] = {}
        """llm node -> the RLM row its calls count on."""
        self._calls: dict[str, tuple[str | None, bool]] = {}
        """call in flight -> (row, counted as the row's own call)."""
        self.query_id: str | None = None
        self._status = "waiting"
        self._started: float | None = None
        self._finished: float | None = None
        self._wall_s: float | None = None
        self._budget: float | None = None
        self._calls_started = 0
        self._retries = 0
        self._totals = Usage()

    def __call__(self, event: Event) -> None:
        with self._lock:
            match event:
                case CallStart():
                    self._call_start(event)
                case CallFinish():
                    self._call_finish(event)
                case CallRetry():
                    self._retries += 1
                case NodeStart():
                    self._node_start(event)
                case NodeFinish():
                    row = self._rows.get(str(event.node_id))
                    if row is not None:
                        row.status = event.status
                        row.finished = self._clock()
                case IterationStart():
                    row = self._rows.get(str(event.node_id))
                    if row is not None:
                        row.iteration = event.iteration
                case CellStart() | CellFinish():
                    row = self._rows.get(str(event.node_id))
                    if row is not None:
                        row.cell_running = isinstance(event, CellStart)
                case QueryStart():
                    self.query_id = event.query_id
                    self._status = "running"
                    self._started = self._clock()
                    self._budget = event.budget_usd
                case QueryFinish():
                    self._status = event.status
                    self._finished = self._clock()
                    self._wall_s = event.wall_s

    def _node_start(self, event: NodeStart) -> None:
        node_id = str(event.node_id)
        parent = event.parent_id
        if event.node_kind == "llm":
            owner = parent if parent in self._rows else self._owner.get(str(parent))
            if owner is not None:
                self._owner[node_id] = str(owner)
            return
        row = _Row(node_id, len(self._rows), self._clock())
        row.parent_id = parent
        row.depth = event.depth or 0
        row.model = event.model
        row.label = event.label
        self._rows[node_id] = row

    def _call_start(self, event: CallStart) -> None:
        self._calls_started += 1
        node_id = str(event.node_id)
        parent = event.parent_id
        row_id: str | None
        if node_id in self._rows:
            row_id = node_id
        elif node_id in self._owner:
            row_id = self._owner[node_id]
        else:
            row_id = parent if parent in self._rows else None
        # A plain sub-call counts on its parent's row; an RLM's own turns (root, child,
        # final) count as that RLM's calls, even when each call has an llm node of its own.
        own = event.call_kind != "sub"
        self._calls[event.call_id] = (row_id, own)
        row = self._rows.get(row_id) if row_id is not None else None
        if row is not None:
            if own:
                row.own_in_flight += 1
            else:
                row.sub_in_flight += 1

    def _call_finish(self, event: CallFinish) -> None:
        row_id, own = self._calls.pop(event.call_id, (None, False))
        failed = event.status != "ok"
        cost = event.cost_usd
        tokens = Usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens)
        self._totals += Usage.of_call(event.status, tokens, cost_usd=cost, from_journal=event.from_journal)
        row = self._rows.get(row_id) if row_id is not None else None
        if row is None:
            return
        row.cost_usd += cost
        if own:
            row.own_in_flight -= 1
            row.own_done += 1
        else:
            row.sub_in_flight -= 1
            row.sub_done += not failed
            row.sub_failed += failed

    def snapshot(self, max_rows: int = 20) -> ProgressSnapshot:
        now = self._clock()
        with self._lock:
            picked = _pick_rows(self._rows, max_rows)
            rows = tuple(
                RowSnapshot(
                    r.node_id,
                    r.parent_id,
                    r.depth,
                    r.model,
                    r.label,
                    r.status,
                    r.iteration,
                    r.cell_running,
                    r.own_in_flight,
                    r.own_done,
                    r.sub_in_flight,
                    r.sub_done,
                    r.sub_failed,
                    r.cost_usd,
                    (r.finished or now) - r.started,
                )
                for r in picked
            )
            if self._wall_s is not None:
                elapsed = self._wall_s
            elif self._started is not None:
                elapsed = (self._finished or now) - self._started
            else:
                elapsed = 0.0
            return ProgressSnapshot(
                query_id=self.query_id,
                status=self._status,
                elapsed_s=elapsed,
                calls=self._calls_started,
                in_flight=len(self._calls),
                retries=self._retries,
                totals=self._totals,
                budget_usd=self._budget,
                rows=rows,
                hidden_rows=len(self._rows) - len(rows),
            )


def _pick_rows(rows: dict[str, _Row], limit: int) -> list[_Row]:
    if len(rows) <= limit:
        return list(rows.values())
    ranked = sorted(
        rows.values(),
        key=lambda r: (r.parent_id is not None, r.finished is not None, -(r.finished or r.started)),
    )
    return sorted(ranked[:limit], key=lambda r: r.order)


# -- drawing ----------------------------------------------------------------------------


def _human(n: float) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def _usd(x: float) -> str:
    return f"${x:,.2f}" if x >= 10 else f"${x:.4f}"


_STATUS_STYLE = {"running": "yellow", "ok": "green", "waiting": "dim"}


def _row_text(row: RowSnapshot) -> Text:
    text = Text()
    text.append(row.node_id, style="bold")
    if row.label and row.label not in (row.node_id, "rlm"):  # the engine labels by kind
        text.append(f" {row.label}")
    if row.model:
        text.append(f"  {row.model}", style="cyan")
    text.append(f"  d{row.depth}", style="dim")
    if row.iteration:
        text.append(f"  iter {row.iteration}")
    if row.status == "running":
        text.append("  cell running" if row.cell_running else "  thinking", style="yellow")
    else:
        text.append(f"  {row.status}", style=_STATUS_STYLE.get(row.status, "red"))
    text.append(f"  calls {row.own_done}" + (f" (+{row.own_in_flight})" if row.own_in_flight else ""))
    if row.sub_in_flight or row.sub_done or row.sub_failed:
        text.append("  sub ")
        text.append(f"⟳{row.sub_in_flight} ", style="yellow")
        text.append(f"✓{row.sub_done} ", style="green")
        text.append(f"✗{row.sub_failed}", style="red" if row.sub_failed else "dim")
    text.append(f"  {_usd(row.cost_usd)}  {row.elapsed_s:.1f}s", style="dim")
    return text


def render_snapshot(snap: ProgressSnapshot) -> RenderableType:
    head = Text()
    head.append("rlm_async ", style="bold")
    head.append(snap.query_id or "", style="dim")
    head.append(f"  {snap.status}", style=_STATUS_STYLE.get(snap.status, "red"))
    head.append(f"  {snap.elapsed_s:.1f}s")

    t = snap.totals
    stats = Text()
    stats.append(f"calls {snap.calls}  in flight {snap.in_flight}  ")
    stats.append(f"failed {t.failed_calls}", style="red" if t.failed_calls else "dim")
    if t.refused_calls:
        stats.append(f"  refused {t.refused_calls}", style="red")
    stats.append(f"  retries {snap.retries}", style="dim")
    stats.append(f"   tokens in {_human(t.prompt_tokens)}")
    if t.cache_hit_ratio is not None:
        stats.append(f" ({t.cache_hit_ratio:.0%} cached)", style="dim")
    stats.append(f"  out {_human(t.completion_tokens)}")

    money = Table.grid(padding=(0, 1))
    if snap.budget_usd:
        share = t.cost_usd / snap.budget_usd
        money.add_row(
            Text(f"{_usd(t.cost_usd)} of {_usd(snap.budget_usd)}"),
            ProgressBar(total=snap.budget_usd, completed=min(t.cost_usd, snap.budget_usd), width=30),
            Text(f"{share:.0%}", style="red" if share >= 0.9 else ""),
        )
    else:
        money.add_row(Text(f"{_usd(t.cost_usd)} (no budget cap)"))

    parts: list[RenderableType] = [head, stats, money]
    branches: dict[str, Tree] = {}
    forest: list[Tree] = []
    for row in snap.rows:  # parents come first, so a shown parent is always there already
        label = _row_text(row)
        parent = branches.get(row.parent_id) if row.parent_id is not None else None
        branch = parent.add(label) if parent is not None else Tree(label)
        if parent is None:
            forest.append(branch)
        branches[row.node_id] = branch
    parts.extend(forest)
    if snap.hidden_rows:
        parts.append(Text(f"… {snap.hidden_rows} more RLM nodes", style="dim"))
    return Group(*parts)


class LiveProgress:
    """A live terminal display of a query's progress; also the event sink that feeds it.

    Not a log: it keeps only counters, and nothing once the display closes.
    """

    def __init__(
        self,
        *,
        console: Console | None = None,
        quiet: bool = False,
        refresh_per_second: float = 4.0,
        max_rows: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state = ProgressState(clock=clock)
        self.console = console if console is not None else Console(stderr=True)
        self.enabled = not quiet and self.console.is_terminal
        """False when quiet or not on a terminal: events are counted, nothing is drawn."""
        self.max_rows = max_rows
        self._refresh_per_second = refresh_per_second
        self._live: Live | None = None

    def __call__(self, event: Event) -> None:
        self.state(event)

    def render(self) -> RenderableType:
        """The current frame (what the refresh thread draws)."""
        rows = max(1, min(self.max_rows, self.console.height - 5))
        return render_snapshot(self.state.snapshot(rows))

    def __enter__(self) -> LiveProgress:
        if self.enabled:
            # Rich's redirect would swap the process-wide sys.stdout/stderr: not ours to touch.
            self._live = Live(
                console=self.console,
                get_renderable=self.render,
                refresh_per_second=self._refresh_per_second,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.stop()  # draws the final frame, which stays on screen
            self._live = None
