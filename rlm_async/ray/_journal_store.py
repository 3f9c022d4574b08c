"""The journal that survives a node: every paid call of every query, on the driver's node.

Why there (the design choice; docs/scale.md has the numbers):

* **Ray's object store** does not survive its owner: an object put by an actor on a node
  that dies is lost, and Ray's lineage reconstruction would re-run the task, paying again.
* **A per-node SQLite file** dies with its node, which is exactly the case to cover.
* **The driver's node** already holds what the batch cannot lose (the output file, the
  coordinators); if it dies the batch stops, and a rerun resumes from both files. So one
  SQLite file there (WAL, fsynced commits), behind a Ray actor pinned to that node, adds no
  new way to fail and nothing to deploy.

The hot path stays local: each query actor has a journal of its own on its node (the
engine's ordinary `Journal`, a temporary file) that answers every lookup. Rows it writes
are queued and shipped to the store in batches (`flush_s`, one round trip per batch, not
per call). A query re-run elsewhere first loads its rows from the store into the new
actor's journal, so its paid calls are answered without sending. What a dead node paid for
in its last `flush_s` and had not shipped is sent again: that is the double-pay window.

Rows are keyed per query (the query's id mixed into the request key), so a re-run of a
query replays exactly that query's calls, sampled ones occurrence by occurrence.
"""

from __future__ import annotations

import contextvars
import hashlib
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from .._journal import Journal
from .._journal.keys import decode_completion, encode_completion
from .._types import Completion, ModelRequest

__all__ = ["CURRENT_QUERY", "JournalStore", "ReplicatedJournal", "StoreRow"]

CURRENT_QUERY: contextvars.ContextVar[str] = contextvars.ContextVar("rlm_async_ray_query", default="")
"""The batch item key of the query running in this task (tasks it starts inherit it)."""

StoreRow = tuple[str, str, str, str]
"""(query key, journal key, model, encoded completion)."""


class JournalStore:
    """The shared record: a SQLite file on the driver's node. Blocking; a Ray actor runs
    one method at a time, so one connection suffices."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS calls (query TEXT NOT NULL, key TEXT PRIMARY KEY, model TEXT NOT NULL,"
            " completion TEXT NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS calls_query ON calls (query)")
        self.puts = 0
        self.batches = 0

    def put_many(self, rows: list[StoreRow]) -> int:
        """Commit `rows` (first row of a key wins); returns how many the file holds."""
        self.batches += 1
        self.puts += len(rows)
        self._db.execute("BEGIN IMMEDIATE")
        self._db.executemany("INSERT OR IGNORE INTO calls VALUES (?, ?, ?, ?)", rows)
        self._db.execute("COMMIT")
        return self.count()

    def rows_for(self, query: str) -> list[StoreRow]:
        return list(
            self._db.execute("SELECT query, key, model, completion FROM calls WHERE query = ?", (query,))
        )

    def queries(self) -> list[str]:
        """Queries with rows here: a rerun of the batch replays them."""
        return [q for (q,) in self._db.execute("SELECT DISTINCT query FROM calls")]

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM calls").fetchone()[0])

    def stats(self) -> dict[str, int]:
        return {"rows": self.count(), "puts": self.puts, "batches": self.batches}

    def close(self) -> None:
        self._db.close()


class ReplicatedJournal(Journal):
    """A query actor's local journal: keys per query, every new row queued for the store.

    `ship` sends a batch of rows to the store (a Ray call); `run_shipper` does so every
    `flush_s` while the actor lives."""

    _outbox: list[StoreRow]
    _seeding: bool

    def key(self, request: ModelRequest) -> str:
        query = CURRENT_QUERY.get()
        base = super().key(request)
        return hashlib.sha256(f"{query}\x00{base}".encode()).hexdigest() if query else base

    async def put(self, key: str, completion: Completion) -> None:
        await super().put(key, completion)
        if not getattr(self, "_seeding", False):
            self.outbox().append((CURRENT_QUERY.get(), key, completion.model, encode_completion(completion)))

    def outbox(self) -> list[StoreRow]:
        if not hasattr(self, "_outbox"):
            self._outbox = []
        return self._outbox

    async def seed(self, rows: list[StoreRow]) -> None:
        """Load rows a query paid for elsewhere (its re-run replays them)."""
        self._seeding = True
        try:
            for _, key, _, raw in rows:
                await Journal.put(self, key, decode_completion(raw))
        finally:
            self._seeding = False

    async def flush(self, ship: Callable[[list[StoreRow]], Awaitable[object]]) -> int:
        rows, self._outbox = self.outbox(), []
        if rows:
            try:
                await ship(rows)
            except BaseException:
                self._outbox = rows + self._outbox  # not shipped: keep them for the next try
                raise
        return len(rows)

    async def run_shipper(self, ship: Callable[[list[StoreRow]], Awaitable[object]], flush_s: float) -> None:
        while True:
            await anyio.sleep(flush_s)
            await self.flush(ship)
