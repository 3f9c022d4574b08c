"""The SQLite file under a journal: header and schema checks, one reader and one writer
connection, batched reads and writes. Blocking: callers run it in worker threads."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import structlog

from ..exceptions import JournalError

_log = structlog.get_logger("rlm_async.journal")

__all__ = ["APPLICATION_ID", "FIX_CORRUPT", "SCHEMA_VERSION", "Files", "Synchronous", "as_journal_error"]

APPLICATION_ID = 0x524C4D4A
"""`PRAGMA application_id` of every journal: the bytes "RLMJ"."""

SCHEMA_VERSION = 1
"""Bumped whenever the tables change; a journal of another version is refused, not migrated."""


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


FIX_CORRUPT = (
    "move the file away (keep it to inspect) and start a new journal; "
    "calls missing from it are simply sent again"
)


class Files:
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
    def open(cls, path: Path, busy_timeout_s: float, synchronous: Synchronous) -> Files:
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
            raise as_journal_error(self.path, exc, "reading") from exc
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
            raise as_journal_error(self.path, exc, f"committing {len(rows)} completed call(s)") from exc
        return [None] * len(rows)

    def integrity_check(self) -> None:
        try:
            problems = [r[0] for r in self.reader.execute("PRAGMA integrity_check")]
        except sqlite3.Error as exc:
            raise as_journal_error(self.path, exc, "checking") from exc
        if problems != ["ok"]:
            raise JournalError(
                f"the journal {self.path} is corrupt ({'; '.join(problems[:3])}); {FIX_CORRUPT}"
            )

    def count(self) -> int:
        try:
            return int(self.reader.execute("SELECT count(*) FROM responses").fetchone()[0])
        except sqlite3.Error as exc:
            raise as_journal_error(self.path, exc, "counting") from exc

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
        raise JournalError(f"the journal {path} is truncated ({len(head)} bytes); {FIX_CORRUPT}")


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
        raise as_journal_error(path, exc, "opening") from exc


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
        raise JournalError(f"the journal {path} has no schema version (it is damaged); {FIX_CORRUPT}")
    if row[0] != str(SCHEMA_VERSION):
        raise JournalError(
            f"the journal {path} has schema version {row[0]}, this rlm_async reads version "
            f"{SCHEMA_VERSION}; use a new journal path, or the rlm_async version that wrote it"
        )
    if "responses" not in tables:
        raise JournalError(f"the journal {path} has no responses table (it is damaged); {FIX_CORRUPT}")


def as_journal_error(path: Path, exc: sqlite3.Error, doing: str) -> JournalError:
    message = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and "locked" in message:
        return JournalError(
            f"the journal {path} stayed locked by another process while {doing} ({message}); "
            "raise busy_timeout_s, or stop the other writer"
        )
    if isinstance(exc, sqlite3.DatabaseError) and (
        "not a database" in message or "malformed" in message or "corrupt" in message
    ):
        return JournalError(f"the journal {path} is corrupt or truncated ({message}); {FIX_CORRUPT}")
    return JournalError(
        f"the journal {path} failed while {doing} ({type(exc).__name__}: {message}); "
        "check free disk space and that the file and its directory are writable"
    )
