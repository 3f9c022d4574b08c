"""Single-flight and group commit: identical calls in flight wait on one `Flight`; blocking
SQLite work that arrives together runs as one batch (`Group`) in a worker thread."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import anyio
import anyio.to_thread

from .._types import Completion
from ..exceptions import JournalError

__all__ = ["Flight", "Group"]


class Flight:
    """One reusable call being answered; identical calls wait on `done`."""

    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: Completion | None = None

    def resolve(self, result: Completion) -> None:
        self.result = result
        self.done.set()


# -- grouping blocking work into batches ----------------------------------------------------

_In = TypeVar("_In")
_Out = TypeVar("_Out")
_T = TypeVar("_T")


class _Slot(Generic[_In, _Out]):
    __slots__ = ("done", "error", "item", "result")

    def __init__(self, item: _In) -> None:
        self.item = item
        self.done = False
        self.result: _Out | None = None
        self.error: BaseException | None = None


class Group(Generic[_In, _Out]):
    """Runs items that arrive while a batch is in progress as the next batch, in one thread
    hop. Whoever holds the lock runs everything queued, so there is no background task, and
    each caller returns once the batch holding its item is done.

    At most one batch runs at a time, which also keeps the one SQLite connection behind
    `run` to one thread at a time.
    """

    def __init__(self, run: Callable[[list[_In]], list[_Out]], *, keep_on_cancel: bool) -> None:
        self._run = run
        self._keep_on_cancel = keep_on_cancel
        self._pending: list[_Slot[_In, _Out]] = []
        self._lock = anyio.Lock()

    async def submit(self, item: _In) -> _Out:
        slot: _Slot[_In, _Out] = _Slot(item)
        self._pending.append(slot)
        try:
            async with self._lock:
                if not slot.done:
                    await self._run_pending()
        except anyio.get_cancelled_exc_class():
            if not slot.done and not self._keep_on_cancel and slot in self._pending:
                self._pending.remove(slot)
            raise
        if slot.error is not None:
            raise JournalError(str(slot.error)) from slot.error
        if not slot.done:  # dropped by `drain()`: the journal closed while this waited
            raise JournalError("the journal was closed while this request waited; open it again")
        return slot.result  # type: ignore[return-value]  # set whenever done without error

    async def flush(self) -> None:
        """Run whatever is still queued (left by cancelled submitters)."""
        async with self._lock:
            batch = await self._run_pending() if self._pending else []
        failed = next((s.error for s in batch if s.error is not None), None)
        if failed is not None:
            raise JournalError(str(failed)) from failed

    async def drain(self) -> None:
        """Wait for the batch in progress, drop what is queued."""
        async with self._lock:
            self._pending.clear()

    async def run_exclusive(self, fn: Callable[[], _T]) -> _T:
        """Run `fn` in a worker thread while no batch runs."""
        async with self._lock:
            with anyio.CancelScope(shield=True):
                result = await anyio.to_thread.run_sync(fn)
        return result

    async def _run_pending(self) -> list[_Slot[_In, _Out]]:
        batch, self._pending = self._pending, []
        # Shielded: the batch belongs to every caller in it, not only to the one running it,
        # and a half-finished batch must still mark each slot done (or failed).
        with anyio.CancelScope(shield=True):
            try:
                results = await anyio.to_thread.run_sync(self._run, [s.item for s in batch])
            except Exception as exc:
                for s in batch:
                    s.error, s.done = exc, True
            else:
                for s, r in zip(batch, results, strict=True):
                    s.result, s.done = r, True
        return batch


# -- the file -----------------------------------------------------------------------------
