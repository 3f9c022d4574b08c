"""The response journal: a SQLite file of completed model calls, so a call made once is
never paid for twice — across a crash, a re-run, or identical calls in flight together.

    journal = await Journal.open("run.journal")
    completion, from_journal = await journal.call(transport.endpoint, request, send)
    ...
    await journal.aclose()

What it is:

* **Keyed by output-affecting content.** `key()` hashes the endpoint and every field of
  `ModelRequest` that can change the answer (model, messages, temperature, max_tokens, and
  any field added later), but not `prompt_cache_key`, which only routes the request.
* **Reused only where reuse is honest.** A call is looked up only when `reusable()`:
  `temperature == 0`, or the journal was opened with `reuse_nondeterministic=True` (say, to
  resume a crashed run exactly as it went). `temperature=None` means "the server's
  default", which is 1.0 at OpenAI and most servers: sampled, so not reused. Every
  completed call is recorded either way, so a later opt-in can replay it. The first row
  written for a key wins; later ones are ignored, so a replay is stable.
* **Single-flight.** Identical reusable calls in flight together are sent once; the others
  wait for that one. If it fails or is cancelled, a waiting call takes over and sends, so
  nothing hangs and nothing is lost. (Within one process: two processes sharing a file may
  both send the same call; the first row written wins.)
* **Durable per call.** `put()` returns only after its row is committed with the WAL
  fsynced (`synchronous=FULL`), so a `kill -9` — or a power cut — loses only calls still
  in flight. Rows that arrive together are committed together, in one transaction and one
  fsync, by whichever writer gets there first ("group commit"), so 1,000 calls finishing
  within a second cost a handful of fsyncs, not 1,000. Reads are grouped the same way.
  Blocking SQLite work runs in worker threads, never on the event loop.
* **Shareable.** Several queries in one process share one `Journal`; several processes can
  open the same file (WAL mode: readers never wait; writers wait up to `busy_timeout_s`).
  The file must be on a local filesystem: WAL needs shared memory, which network
  filesystems do not provide reliably.
* **Never silently foreign.** The file carries `PRAGMA application_id` ("RLMJ") and a
  schema version. A text file, a truncated or corrupt file, a SQLite database of another
  application, or a journal of another schema version raises `JournalError` naming the
  path and the fix; a foreign file is never modified.

What it is not: a cache with expiry or size limits (delete the file to start afresh), or
a record of failed calls (only completions are stored; errors are never replayed). The
rate-limit headers of a stored completion are not kept: they described the server at the
time and would mislead the governor on replay.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import anyio
import anyio.to_thread
import structlog

from ._events import emit
from ._types import Completion, Message, ModelRequest, Usage
from .exceptions import JournalError

__all__ = ["Journal"]

_log = structlog.get_logger("rlm_async.journal")

APPLICATION_ID = 0x524C4D4A
"""`PRAGMA application_id` of every journal: the bytes "RLMJ"."""

SCHEMA_VERSION = 1
"""Bumped whenever the tables change; a journal of another version is refused, not migrated."""

_KEY_SCHEME = "rlm_async.journal.key/v1"
"""Hashed into every key, so a change to how keys are built can never collide with old rows."""

_NOT_OUTPUT_AFFECTING = frozenset({"prompt_cache_key"})
"""`ModelRequest` fields that do not change the answer and so stay out of the key. Every
other field is in the key, including fields added to `ModelRequest` later."""

_INSERT = "INSERT OR IGNORE INTO responses (key, model, completion, created_at) VALUES (?, ?, ?, ?)"
_INSERT_META = "INSERT INTO meta (name, value) VALUES ('schema_version', ?), ('created_by', 'rlm_async')"

_SQLITE_MAGIC = b"SQLite format 3\x00"
_MIN_SQLITE_FILE = 512  # the smallest page size: a real database file is at least one page
_READ_CHUNK = 500  # keys per `IN (...)`: well under SQLite's variable limit

_SCHEMA = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE responses ("
    " key TEXT PRIMARY KEY,"
    " model TEXT NOT NULL,"
    " completion TEXT NOT NULL,"  # JSON: text, usage, model, finish_reason
    " created_at REAL NOT NULL)",
)

Synchronous = Literal["full", "normal"]


class Journal:
    """A persistent, shareable record of completed model calls. Open with `Journal.open`."""

    def __init__(self, _state: _Files, *, reuse_nondeterministic: bool, clock: Callable[[], float]) -> None:
        # Private: `open()` validates the file and builds the state first.
        self._files = _state
        self.path = _state.path
        self.reuse_nondeterministic = reuse_nondeterministic
        self._clock = clock
        self._flights: dict[str, _Flight] = {}
        self._reads: _Group[str, str | None] = _Group(_state.read_many, keep_on_cancel=False)
        # A `put` cancelled while queued still gets its row committed: the call was paid for.
        self._writes: _Group[tuple[str, str, str, float], None] = _Group(
            _state.write_many, keep_on_cancel=True
        )
        self._closed = False

    # -- opening and closing ------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        reuse_nondeterministic: bool = False,
        busy_timeout_s: float = 30.0,
        synchronous: Synchronous = "full",
        clock: Callable[[], float] = time.time,
    ) -> Journal:
        """Open the journal at `path`, creating it if the file is missing or empty.

        `reuse_nondeterministic`: also reuse calls with `temperature != 0` (or unset).
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
        files = await anyio.to_thread.run_sync(
            _Files.open, Path(os.fspath(path)), busy_timeout_s, synchronous
        )
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

    def key(self, endpoint: str, request: ModelRequest) -> str:
        """The journal key of `request` sent to `endpoint`: hex SHA-256, stable across runs,
        processes and Python versions (no `hash()`, no ids, no timestamps)."""
        return request_key(endpoint, request)

    def reusable(self, request: ModelRequest) -> bool:
        """Whether a stored answer may stand in for sending `request`.

        Only greedy decoding (`temperature == 0`) is treated as deterministic. `None` means
        the server's default temperature — 1.0 at OpenAI and most servers — so it is a
        sample, and reusing one sample for every identical call would silently remove the
        variety a caller asked for (e.g. majority voting over identical sub-calls).
        """
        return self.reuse_nondeterministic or request.temperature == 0

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
        row = (key, completion.model, _encode_completion(completion), self._clock())
        await self._writes.submit(row)

    async def call(
        self,
        endpoint: str,
        request: ModelRequest,
        send: Callable[[], Awaitable[Completion]],
        *,
        call_id: str | None = None,
    ) -> tuple[Completion, bool]:
        """Answer `request` from the journal, from an identical call in flight, or by
        awaiting `send()` and recording its completion. Returns `(completion, from_journal)`;
        `from_journal` is true when nothing was sent for this call (so it cost nothing).

        `send` must raise on failure; a failure is never recorded. `call_id` only labels the
        `journal.hit` event. A `JournalError` from writing the row propagates: the caller
        asked for durability, and a journal that cannot write (disk full, read-only file,
        locked past `busy_timeout_s`) needs fixing before more money is spent.
        """
        self._check_open()
        key = self.key(endpoint, request)
        if not self.reusable(request):
            completion = await send()
            await self.put(key, completion)
            return completion, False

        while (flight := self._flights.get(key)) is not None:
            await flight.done.wait()
            if flight.result is not None:
                emit("journal.hit", call_id=call_id, source="in_flight", key=key)
                return flight.result, True
            # The leader failed or was cancelled: loop, and lead unless another waiter did.

        flight = _Flight()
        self._flights[key] = flight
        try:
            stored = await self.get(key)
            if stored is not None:
                flight.resolve(stored)
                emit("journal.hit", call_id=call_id, source="journal", key=key)
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
            return _decode_completion(raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise JournalError(
                f"the journal {self.path} holds an unreadable row for key {key[:16]}… ({exc}); {_FIX_CORRUPT}"
            ) from exc


_FIX_CORRUPT = (
    "move the file away (keep it to inspect) and start a new journal; "
    "calls missing from it are simply sent again"
)


# -- keys ---------------------------------------------------------------------------------


def request_key(endpoint: str, request: ModelRequest) -> str:
    """See `Journal.key`. Fields that are `None` are left out, so adding an optional field
    to `ModelRequest` does not change the keys of existing rows."""
    body: dict[str, Any] = {"scheme": _KEY_SCHEME, "endpoint": endpoint}
    for f in dataclasses.fields(request):
        if f.name in _NOT_OUTPUT_AFFECTING:
            continue
        value = getattr(request, f.name)
        if value is not None:
            body[f.name] = _canonical(value, f.name)
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _canonical(value: Any, where: str) -> Any:
    """A JSON value that is equal exactly when the request means the same thing."""
    if isinstance(value, Message):
        return [value.role, value.content]
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        # temperature=0 and temperature=0.0 are the same request; repr() of a float is the
        # shortest round-trip form, identical on every platform.
        return int(value) if value.is_integer() else value if math.isfinite(value) else repr(value)
    if isinstance(value, (tuple, list)):
        return [_canonical(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v, where) for k, v in value.items()}
    raise TypeError(
        f"ModelRequest.{where} has a value of type {type(value).__name__} that the journal key "
        "cannot encode; extend rlm_async._journal._canonical for it"
    )


# -- completions as stored ------------------------------------------------------------------


def _encode_completion(c: Completion) -> str:
    return json.dumps(
        {
            "text": c.text,
            "model": c.model,
            "finish_reason": c.finish_reason,
            "usage": [c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.cached_tokens],
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


def _decode_completion(raw: str) -> Completion:
    d = json.loads(raw)
    prompt, completion, cached = (int(n) for n in d["usage"])
    finish = d["finish_reason"]
    if not isinstance(d["text"], str) or not isinstance(d["model"], str):
        raise TypeError("text and model must be strings")
    return Completion(
        text=d["text"],
        usage=Usage(prompt, completion, cached),
        model=d["model"],
        finish_reason=None if finish is None else str(finish),
    )


# -- single-flight ------------------------------------------------------------------------


class _Flight:
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


class _Group(Generic[_In, _Out]):
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


class _Files:
    """The SQLite side: two connections to one file, each used by one thread at a time.

    A separate reader connection lets lookups proceed while a commit waits for its fsync
    (WAL readers never block on the writer). Every method here blocks; call them through
    `anyio.to_thread.run_sync`.
    """

    def __init__(self, path: Path, reader: sqlite3.Connection, writer: sqlite3.Connection) -> None:
        self.path = path
        self.reader = reader
        self.writer = writer
        self.closed = False

    @classmethod
    def open(cls, path: Path, busy_timeout_s: float, synchronous: Synchronous) -> _Files:
        _check_header(path)
        writer = _connect(path, busy_timeout_s)
        try:
            _prepare(path, writer, synchronous)
            reader = _connect(path, busy_timeout_s)
        except BaseException:
            writer.close()
            raise
        return cls(path, reader, writer)

    def read_many(self, keys: list[str]) -> list[str | None]:
        self._check_open()
        found: dict[str, str] = {}
        unique = list(dict.fromkeys(keys))
        try:
            for start in range(0, len(unique), _READ_CHUNK):
                chunk = unique[start : start + _READ_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self.reader.execute(
                    f"SELECT key, completion FROM responses WHERE key IN ({marks})", chunk
                )
                found.update(rows)
        except sqlite3.Error as exc:
            raise _as_journal_error(self.path, exc, "reading") from exc
        return [found.get(k) for k in keys]

    def write_many(self, rows: list[tuple[str, str, str, float]]) -> list[None]:
        self._check_open()
        conn = self.writer
        try:
            # IMMEDIATE takes the write lock up front, so waiting on another process happens
            # here under the busy timeout rather than failing mid-transaction.
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_INSERT, rows)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise _as_journal_error(self.path, exc, f"committing {len(rows)} completed call(s)") from exc
        return [None] * len(rows)

    def integrity_check(self) -> None:
        try:
            problems = [r[0] for r in self.reader.execute("PRAGMA integrity_check")]
        except sqlite3.Error as exc:
            raise _as_journal_error(self.path, exc, "checking") from exc
        if problems != ["ok"]:
            raise JournalError(
                f"the journal {self.path} is corrupt ({'; '.join(problems[:3])}); {_FIX_CORRUPT}"
            )

    def count(self) -> int:
        try:
            return int(self.reader.execute("SELECT count(*) FROM responses").fetchone()[0])
        except sqlite3.Error as exc:
            raise _as_journal_error(self.path, exc, "counting") from exc

    def close(self) -> None:
        self.closed = True
        self.reader.close()
        self.writer.close()

    def _check_open(self) -> None:
        if self.closed:
            raise JournalError(f"the journal {self.path} is closed; open it again with Journal.open(...)")


def _connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    try:
        # isolation_level=None: no implicit transactions; every write batch opens its own.
        return sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise JournalError(
            f"cannot open the journal {path} ({exc}); check that its directory exists and is writable"
        ) from exc


def _check_header(path: Path) -> None:
    """Refuse a file that is not SQLite before SQLite sees it: SQLite treats a short file
    that merely starts with its magic as an empty database and would write over it."""
    try:
        with path.open("rb") as f:
            head = f.read(_MIN_SQLITE_FILE)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise JournalError(f"cannot read the journal {path} ({exc}); check its permissions") from exc
    if not head:
        return  # empty: a journal another process is creating right now, or a fresh file
    if not head.startswith(_SQLITE_MAGIC):
        raise JournalError(
            f"{path} is not an rlm_async response journal (it is not a SQLite database); "
            "point the journal at a new path, or move this file away if it is a damaged journal"
        )
    if len(head) < _MIN_SQLITE_FILE:
        raise JournalError(f"the journal {path} is truncated ({len(head)} bytes); {_FIX_CORRUPT}")


def _prepare(path: Path, conn: sqlite3.Connection, synchronous: Synchronous) -> None:
    """Validate the file, or create the schema in an empty one, under the write lock so two
    processes opening a new path at once cannot both create it."""
    try:
        # A foreign database is refused before taking its write lock: it is not ours to lock.
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        if app_id not in (0, APPLICATION_ID):
            _validate(path, conn, app_id, [])
        conn.execute("BEGIN IMMEDIATE")
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            tables = sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
            if app_id == 0 and not tables:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(_INSERT_META, (str(SCHEMA_VERSION),))
            else:
                _validate(path, conn, app_id, tables)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        # Only now, once the file is known to be ours, switch it to WAL: the mode is stored
        # in the file, and a foreign file must be left exactly as it was.
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            _log.warning(
                "journal not in WAL mode; concurrent readers will wait for writers",
                path=str(path),
                journal_mode=mode,
            )
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    except JournalError:
        conn.close()
        raise
    except sqlite3.Error as exc:
        conn.close()
        raise _as_journal_error(path, exc, "opening") from exc


def _validate(path: Path, conn: sqlite3.Connection, app_id: int, tables: Sequence[str]) -> None:
    if app_id != APPLICATION_ID:
        what = (
            f"application_id {app_id:#010x}"
            if app_id
            else f"tables {', '.join(tables[:5])} and no rlm_async marker"
        )
        raise JournalError(
            f"{path} is a SQLite database of another application ({what}), not an rlm_async "
            "response journal; point the journal at a new path (it is left untouched)"
        )
    try:
        row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
    except sqlite3.OperationalError:
        row = None
    if row is None:
        raise JournalError(f"the journal {path} has no schema version (it is damaged); {_FIX_CORRUPT}")
    if row[0] != str(SCHEMA_VERSION):
        raise JournalError(
            f"the journal {path} has schema version {row[0]}, this rlm_async reads version "
            f"{SCHEMA_VERSION}; use a new journal path, or the rlm_async version that wrote it"
        )
    if "responses" not in tables:
        raise JournalError(f"the journal {path} has no responses table (it is damaged); {_FIX_CORRUPT}")


def _as_journal_error(path: Path, exc: sqlite3.Error, doing: str) -> JournalError:
    message = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and "locked" in message:
        return JournalError(
            f"the journal {path} stayed locked by another process while {doing} ({message}); "
            "raise busy_timeout_s, or stop the other writer"
        )
    if isinstance(exc, sqlite3.DatabaseError) and (
        "not a database" in message or "malformed" in message or "corrupt" in message
    ):
        return JournalError(f"the journal {path} is corrupt or truncated ({message}); {_FIX_CORRUPT}")
    return JournalError(
        f"the journal {path} failed while {doing} ({type(exc).__name__}: {message}); "
        "check free disk space and that the file and its directory are writable"
    )
