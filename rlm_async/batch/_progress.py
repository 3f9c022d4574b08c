"""Live batch progress: queries done / failed / running, dollars against the cap, sub-calls
in flight, ETA. Draws on a terminal only (stderr by default); off a terminal it only counts.

It is two things at once: the runner's `BatchObserver` (queries started and rows done) and
an event sink for every query (model calls in flight). Both only bump counters under a
lock; rich's refresh thread draws a snapshot a few times a second.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from rich.console import Console, RenderableType
from rich.live import Live
from rich.text import Text

from .._events import Event
from ._budget import BatchBudget
from ._items import BatchItem
from ._rows import ANSWERED, BatchRow

__all__ = ["BatchProgress", "BatchSnapshot"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchSnapshot:
    total: int
    done: int
    """Rows written, this run and kept from earlier runs."""
    failed: int
    """Rows that did not answer (error, timeout, budget, invalid, not started)."""
    running: int
    calls_in_flight: int
    spent_usd: float
    cap_usd: float | None
    eta_s: float | None


class BatchProgress:
    """The batch's live display and counters."""

    def __init__(
        self,
        *,
        total: int,
        already_done: int = 0,
        console: Console | None = None,
        quiet: bool = False,
        refresh_per_second: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.console = console if console is not None else Console(stderr=True)
        self.enabled = not quiet and self.console.is_terminal
        self._clock = clock
        self._lock = threading.Lock()
        self._done = already_done
        self._failed = 0
        self._running = 0
        self._in_flight = 0
        self._finishes: deque[float] = deque(maxlen=200)
        self._budget: BatchBudget | None = None
        self._refresh = refresh_per_second
        self._live: Live | None = None
        self._rows_usd = 0.0
        self._rows_only = False
        self._rows_cap: float | None = None

    def set_total(self, total: int, *, already_done: int = 0) -> None:
        """The inputs in all, and how many already have rows (a resumed batch)."""
        with self._lock:
            self.total = total
            self._done = already_done

    # ------------------------------------------------------------------ observer
    def batch_started(self, budget: BatchBudget) -> None:
        self._budget = budget

    def query_started(self, item: BatchItem) -> None:
        with self._lock:
            self._running += 1

    def rows_only(self, cap_usd: float | None, *, spent_before: float = 0.0) -> None:
        """No batch ledger in this process (a distributed runner): dollars are what the
        rows report (plus `spent_before`, rows kept from an earlier run), against `cap_usd`."""
        with self._lock:
            self._rows_cap = cap_usd
            self._rows_usd = spent_before
            self._rows_only = True

    def query_requeued(self) -> None:
        """A started query went back to the queue (its Ray actor died); it starts again."""
        with self._lock:
            self._running -= 1

    def row_done(self, row: BatchRow) -> None:
        with self._lock:
            self._done += 1
            if row.status not in ANSWERED:
                self._failed += 1
            if row.started_at is not None and row.status not in ("invalid", "not_started"):
                self._running -= 1
            self._finishes.append(self._clock())
            self._rows_usd += row.cost_usd

    # ------------------------------------------------------------------ event sink
    def __call__(self, event: Event) -> None:
        if event.kind == "call.start":
            with self._lock:
                self._in_flight += 1
        elif event.kind == "call.finish":
            with self._lock:
                self._in_flight -= 1

    def interrupted(self, *, cancelling: bool) -> None:
        """Say on the console what a Ctrl-C does (even when quiet: the user asked)."""
        running = self.snapshot().running
        if cancelling:
            line = (
                f"Ctrl-C again: cancelling the {running:,} running queries; rerun the same command to finish"
            )
        else:
            line = (
                f"Ctrl-C: no more queries start; the {running:,} running finish and write their rows. "
                "Ctrl-C again to cancel them."
            )
        self.console.print(line, style="yellow", highlight=False, soft_wrap=True)

    # ------------------------------------------------------------------ reading
    def snapshot(self) -> BatchSnapshot:
        budget = self._budget
        spent = float(budget.spent().usd) if budget is not None else 0.0
        cap = budget.limits.max_usd if budget is not None else None
        if self._rows_only:
            spent, cap = self._rows_usd, self._rows_cap
        with self._lock:
            left = self.total - self._done
            eta: float | None = None
            if len(self._finishes) >= 2 and left > 0:
                span = self._clock() - self._finishes[0]
                if span > 0:
                    eta = left * span / (len(self._finishes) - 1)
            return BatchSnapshot(
                total=self.total,
                done=self._done,
                failed=self._failed,
                running=self._running,
                calls_in_flight=self._in_flight,
                spent_usd=spent,
                cap_usd=cap,
                eta_s=eta,
            )

    def render(self) -> RenderableType:
        return render_batch(self.snapshot())

    def __enter__(self) -> BatchProgress:
        if self.enabled:
            self._live = Live(
                console=self.console,
                get_renderable=self.render,
                refresh_per_second=self._refresh,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def render_batch(s: BatchSnapshot) -> Text:
    dollars = f"${s.spent_usd:,.4f}" + (f" of ${s.cap_usd:,.2f}" if s.cap_usd is not None else "")
    eta = "--" if s.eta_s is None else _duration(s.eta_s)
    text = Text()
    text.append(f"queries {s.done:,}/{s.total:,} done", style="bold")
    text.append(f", {s.failed:,} failed, {s.running:,} running  ")
    text.append(dollars, style="green")
    text.append(f"  {s.calls_in_flight:,} calls in flight  ETA {eta}")
    return text


def _duration(seconds: float) -> str:
    m, sec = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"
