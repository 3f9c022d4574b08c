"""Queries as jobs: their state, their progress feed, and a small SQLite store of records.

Every query the service runs (a chat completion or a job) is a `Job`: it collects the
engine's events as progress records with sequence numbers (so an SSE client can resume
with `Last-Event-ID`), keeps running usage (so a cancelled query keeps what it spent), and
is cancelled through its own cancel scope (the engine kills its workers on the way out).
Jobs created through `/v1/rlm/jobs` are written to `JobStore` when created and when they
finish, so a finished result survives a restart; one found running at start-up was cut off
by the restart and is marked so.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio

from .. import _events
from .._result import RLMResult
from .._types import Usage
from ._adapter import openai_usage, progress_of, result_summary, usage_of, usage_of_event
from ._errors import APIError

__all__ = ["Entry", "Gap", "Job", "JobState", "JobStore"]

Entry = tuple[int, str, dict[str, Any]]
"""One entry of a job's feed: (sequence, SSE event name, data)."""


@dataclass(frozen=True, slots=True)
class Gap:
    """Entries a reader never got: dropped for newer ones (`[serve] max_events`) before it
    read them."""

    missed: int
    after: int
    """The last sequence the reader had."""
    next: int
    """The sequence it gets next."""

    def to_dict(self) -> dict[str, int]:
        return {"missed": self.missed, "after": self.after, "next": self.next}


JobState = Literal["queued", "running", "completed", "cancelled", "failed"]
_FINISHED = ("completed", "cancelled", "failed")
MAX_EVENTS = 10_000
"""Feed entries a job keeps unless told otherwise: `ServeConfig.max_events`'s default."""


class Job:
    """One query: state, progress feed, usage, and how to cancel it."""

    def __init__(
        self,
        *,
        kind: str,
        tenant: str,
        model: str,
        job_id: str | None = None,
        progress: bool = True,
        max_events: int = MAX_EVENTS,
    ) -> None:
        self.id = job_id or ("job-" + uuid.uuid4().hex[:24])
        self.kind = kind
        self.progress = progress
        """Whether the engine's events become progress records in the feed: off for a chat
        completion that is not streamed, whose feed no one reads (its status and `done`
        records are kept)."""
        self.tenant = tenant
        self.model = model
        self.created_at = time.time()
        self.finished_at: float | None = None
        self.state: JobState = "queued"
        self.result: dict[str, Any] | None = None
        """The result summary once finished: answer, status, detail, ..."""
        self.error: str | None = None
        self.refusal: APIError | None = None
        """The client's own error that ended the query before it ran (its context file
        missing, or not UTF-8): a chat completion answers with its status, not a 500."""
        self.usage = Usage()
        self.feed: deque[Entry] = deque(maxlen=max_events)
        """(sequence, SSE event name, data), the newest `max_events`: sequences count up from
        1 with no holes, so a reader that finds one past the next it expected knows how many
        were dropped before it read them."""
        self._seq = 0
        self._changed = anyio.Event()
        self._done = anyio.Event()
        self.scope: anyio.CancelScope | None = None
        self.cancel_requested = False
        self.query_id: str | None = None
        """The engine's id of the query (its trace is `<query_id>.jsonl` under `--trace`)."""

    @property
    def last_event_id(self) -> int:
        """The id of the newest event in the feed (0: none yet); SSE ids count up from 1."""
        return self._seq

    # ------------------------------------------------------------------ progress
    def _publish(self, name: str, data: dict[str, Any]) -> None:
        self._seq += 1
        self.feed.append((self._seq, name, data))
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def sink(self, event: _events.Event) -> None:
        """The event sink given to the engine: synchronous, never blocks."""
        if self.query_id is None and isinstance(event, _events.QueryStart):
            self.query_id = event.query_id
        added = usage_of_event(event)
        if added is not None:
            self.usage = self.usage + added
        if not self.progress:
            return
        record = progress_of(event)
        if record is not None:
            self._publish("progress", record)

    def set_running(self) -> None:
        self.state = "running"
        self._publish("status", {"state": "running"})

    def finish(self, result: RLMResult) -> None:
        self.usage = usage_of(result)
        self.result = result_summary(result)
        self._end("completed")

    def fail(self, error: str, *, refusal: APIError | None = None) -> None:
        self.error = error
        self.refusal = refusal
        self._end("failed")

    def cancelled(self, why: str) -> None:
        self.error = why
        self._end("cancelled")

    def _end(self, state: JobState) -> None:
        if self.done:
            return
        self.state = state
        self.finished_at = time.time()
        self._publish("done", self.to_dict())
        self._done.set()

    @property
    def done(self) -> bool:
        return self.state in _FINISHED

    async def wait(self) -> None:
        await self._done.wait()

    def cancel(self, why: str = "cancelled by the client") -> None:
        """Cancel the query (its workers are killed); what it spent so far is kept."""
        if self.done:
            return
        self.cancel_requested = True
        self.error = why
        if self.scope is not None:  # else its task sees cancel_requested when it starts
            self.scope.cancel()

    async def events_after(self, last_id: int) -> list[Entry]:
        """Feed entries after `last_id`, waiting for one if there is none yet (and the job
        is not finished)."""
        while True:
            changed = self._changed
            fresh = [entry for entry in self.feed if entry[0] > last_id]
            if fresh or self.done:
                return fresh
            await changed.wait()

    async def follow(self, after: int = 0) -> AsyncIterator[Entry | Gap]:
        """Every feed entry after sequence `after`, as it comes, until the job's last; a
        `Gap` first wherever entries were dropped before this reader got to them (the
        jobs API's events stream and a streamed chat completion both read it so)."""
        cursor = after
        while True:
            fresh = await self.events_after(cursor)
            for entry in fresh:
                if entry[0] > cursor + 1:
                    yield Gap(missed=entry[0] - cursor - 1, after=cursor, next=entry[0])
                cursor = entry[0]
                yield entry
            if not fresh or (self.done and cursor >= self._seq):  # none fresh: it ended
                return

    # ------------------------------------------------------------------ records
    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "rlm.job",
            "query_id": self.query_id,
            "model": self.model,
            "created_at": int(self.created_at),
            "finished_at": int(self.finished_at) if self.finished_at else None,
            "state": self.state,
            "status": self.result["status"] if self.result else None,
            "answer": self.result["answer"] if self.result else None,
            "detail": (self.result or {}).get("detail") or self.error,
            "usage": openai_usage(self.usage),
            "result": self.result,
        }


class JobStore:
    """Job records in SQLite (`jobs.sqlite` in the data directory), written on creation and
    on finishing; each write is committed before the call returns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, record TEXT NOT NULL)"
        )
        self._lock = anyio.Lock()
        # Jobs that were running when the server stopped cannot be resumed: say so.
        rows = self._db.execute("SELECT id, record FROM jobs").fetchall()
        for job_id, text in rows:
            record = json.loads(text)
            if record.get("state") in ("queued", "running"):
                record.update(state="failed", detail="the server stopped before this job finished")
                self._db.execute("UPDATE jobs SET record = ? WHERE id = ?", (json.dumps(record), job_id))

    async def put(self, job: Job) -> None:
        text = json.dumps(job.to_dict())
        async with self._lock:
            await anyio.to_thread.run_sync(
                self._db.execute,
                "INSERT OR REPLACE INTO jobs (id, tenant, record) VALUES (?, ?, ?)",
                (job.id, job.tenant, text),
            )

    async def get(self, job_id: str, tenant: str) -> dict[str, Any] | None:
        async with self._lock:
            row = await anyio.to_thread.run_sync(
                lambda: self._db.execute(
                    "SELECT record FROM jobs WHERE id = ? AND tenant = ?", (job_id, tenant)
                ).fetchone()
            )
        if row is None:
            return None
        record: dict[str, Any] = json.loads(row[0])
        return record

    def close(self) -> None:
        self._db.close()
