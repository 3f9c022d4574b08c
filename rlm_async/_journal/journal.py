"""The `Journal`: see the package docstring for what it is and is not."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import structlog

from .._events import JournalHit, emit
from .._types import Completion, ModelRequest
from ..exceptions import JournalError
from ._files import FIX_CORRUPT, Files, Synchronous
from ._groups import Flight, Group
from .keys import decode_completion, encode_completion, greedy, occurrence_key, request_key

__all__ = ["Journal"]

_log = structlog.get_logger("rlm_async.journal")


class Journal:
    """A persistent, shareable record of completed model calls. Open with `Journal.open`."""

    def __init__(self, _state: Files, *, reuse_nondeterministic: bool, clock: Callable[[], float]) -> None:
        # Private: `open()` validates the file and builds the state first.
        self._files = _state
        self.path = _state.path
        self.reuse_nondeterministic = reuse_nondeterministic
        self._clock = clock
        self._flights: dict[str, Flight] = {}
        self._occurrences: dict[str, int] = {}  # sampled-call key -> how many were made
        self._reads: Group[str, str | None] = Group(_state.read_many, keep_on_cancel=False)
        # A `put` cancelled while queued still gets its row committed: the call was paid for.
        self._writes: Group[tuple[str, str, str, float], None] = Group(_state.write_many, keep_on_cancel=True)
        self._closed = False

    # -- opening and closing ------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        reuse_nondeterministic: bool = True,
        busy_timeout_s: float = 30.0,
        synchronous: Synchronous = "full",
        clock: Callable[[], float] = time.time,
    ) -> Journal:
        """Open the journal at `path`, creating it if the file is missing or empty.

        `reuse_nondeterministic`: also replay sampled calls (`temperature != 0` or unset),
        each occurrence its own row (the default); `False` looks up greedy calls only.
        `busy_timeout_s`: how long a write waits for another process' write to finish.
        `synchronous`: "full" (default) fsyncs the WAL on every commit, so a committed row
        survives a power cut; "normal" skips that fsync — a committed row still survives
        `kill -9`, but the last commits may roll back after a power cut or OS crash.
        `clock`: wall-clock seconds for `created_at` (injected for tests).

        Raises `JournalError` when the file is not a journal of this version.
        """
        if synchronous not in ("full", "normal"):
            raise JournalError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
        if not busy_timeout_s > 0:
            raise JournalError(f"busy_timeout_s must be positive, not {busy_timeout_s!r}")
        files = await anyio.to_thread.run_sync(Files.open, Path(os.fspath(path)), busy_timeout_s, synchronous)
        return cls(files, reuse_nondeterministic=reuse_nondeterministic, clock=clock)

    async def aclose(self) -> None:
        """Commit rows still queued (from cancelled `put`s) and close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                await self._writes.flush()
            finally:
                await self._reads.drain()
                await anyio.to_thread.run_sync(self._files.close)

    async def __aenter__(self) -> Journal:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- keys and policy ----------------------------------------------------------------

    def key(self, request: ModelRequest) -> str:
        """The journal key of `request`: hex SHA-256 of what was asked (not where it was
        sent), stable across runs, processes and Python versions (no `hash()`, no ids, no
        timestamps). A sampled call's row is keyed by `occurrence_key(key, n)`."""
        return request_key(request)

    def reusable(self, request: ModelRequest) -> bool:
        """Whether a stored answer may stand in for sending `request`.

        Greedy decoding (`temperature == 0`) always. A sample (`None` means the server's
        default temperature, 1.0 at OpenAI and most servers) only with
        `reuse_nondeterministic`, and then occurrence by occurrence, so identical sampled
        calls keep their variety (e.g. majority voting over identical sub-calls).
        """
        return self.reuse_nondeterministic or greedy(request)

    # -- storage ------------------------------------------------------------------------

    async def get(self, key: str) -> Completion | None:
        """The stored completion for `key`, or `None`. Sees rows other processes committed."""
        self._check_open()
        raw = await self._reads.submit(key)
        return None if raw is None else self._decode(key, raw)

    async def put(self, key: str, completion: Completion) -> None:
        """Store `completion` under `key`; returns once the row is committed (durably, per
        `synchronous`). If a row for `key` exists already, it is kept and this one dropped."""
        self._check_open()
        row = (key, completion.model, encode_completion(completion), self._clock())
        await self._writes.submit(row)

    async def call(
        self,
        request: ModelRequest,
        send: Callable[[], Awaitable[Completion]],
        *,
        call_id: str | None = None,
        key: str | None = None,
    ) -> tuple[Completion, bool]:
        """Answer `request` from the journal, from an identical call in flight, or by
        awaiting `send()` and recording its completion. Returns `(completion, from_journal)`;
        `from_journal` is true when nothing was sent for this call (so it cost nothing).

        `send` must raise on failure; a failure is never recorded. `call_id` only labels the
        `journal.hit` event. A `JournalError` from writing the row propagates: the caller
        asked for durability, and a journal that cannot write (disk full, read-only file,
        locked past `busy_timeout_s`) needs fixing before more money is spent. `key`:
        `self.key(request)`, when the caller made it already (a fan-out's followers make
        theirs while the warm-up call is in flight).
        """
        self._check_open()
        if key is None:
            key = self.key(request)
        if not greedy(request):
            return await self._call_sampled(key, request, send, call_id)

        while (flight := self._flights.get(key)) is not None:
            await flight.done.wait()
            if flight.result is not None:
                emit(JournalHit, call_id=call_id, source="in_flight", key=key)
                return flight.result, True
            # The leader failed or was cancelled: loop, and lead unless another waiter did.

        flight = Flight()
        self._flights[key] = flight
        try:
            stored = await self.get(key)
            if stored is not None:
                flight.resolve(stored)
                emit(JournalHit, call_id=call_id, source="journal", key=key)
                return stored, True
            completion = await send()
            # Release the followers now; the flight stays registered until the row is
            # committed, so a call arriving meanwhile takes this result instead of sending.
            flight.resolve(completion)
            await self.put(key, completion)
            return completion, False
        finally:
            del self._flights[key]
            flight.done.set()

    async def _call_sampled(
        self,
        key: str,
        request: ModelRequest,
        send: Callable[[], Awaitable[Completion]],
        call_id: str | None,
    ) -> tuple[Completion, bool]:
        """A sampled call: the n-th identical one is its own row, never shared in flight."""
        n = self._occurrences.get(key, 0) + 1
        self._occurrences[key] = n
        key = occurrence_key(key, n)
        if self.reusable(request):
            stored = await self.get(key)
            if stored is not None:
                emit(JournalHit, call_id=call_id, source="journal", key=key)
                return stored, True
        completion = await send()
        await self.put(key, completion)
        return completion, False

    async def verify(self) -> None:
        """Run SQLite's full `integrity_check` (reads the whole file); raise `JournalError`
        if it finds anything wrong. `open()` only does the cheap checks."""
        self._check_open()
        await self._reads.run_exclusive(self._files.integrity_check)

    async def count(self) -> int:
        """Number of rows in the file (all processes' writes)."""
        self._check_open()
        return await self._reads.run_exclusive(self._files.count)

    # -- internals ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise JournalError(f"the journal {self.path} is closed; open it again with Journal.open(...)")

    def _decode(self, key: str, raw: str) -> Completion:
        try:
            return decode_completion(raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise JournalError(
                f"the journal {self.path} holds an unreadable row for key {key[:16]}… ({exc}); {FIX_CORRUPT}"
            ) from exc
