# Over 500 lines: the writer and the reader of one file format stay together, so they cannot drift.
"""The JSONL trace: a sink that writes one file per query, and the loader that reads it back.

Format (version 2; `docs/trace-format.md` has the full description):

    line 1     header  {"format": "rlm_async.trace", "version": 2, "query_id": "q-…",
                        "created_unix": 1766000000.12, "clock_origin": 8812.5,
                        "redacted": []}
    line 2..n  event   {"kind": "call.finish", "time": 8813.9, "query_id": "q-…",
                        "node_id": "n-7", "depth": 1, "fields": {...}}

One JSON object per line, UTF-8, `\\n`-terminated, in emission order. `time` is the engine
clock (monotonic seconds); `created_unix + (time - clock_origin)` turns it into wall-clock
time. `kind` names one of the event classes of `rlm_async._events`; `fields` is its payload
(every field of the class but the envelope), kept apart from the envelope as in version 1.

The reader turns each line back into its typed event, checking every field against the
class (the one place a trace's content is validated; the summary trusts what it gets).
Lines it cannot parse (a process killed mid-write leaves half a line) or whose fields do
not fit their class are counted in `Trace.bad_lines`; kinds it does not know (written by
a newer rlm_async of the same version) are counted in `Trace.unknown_events`. It reads
version 1 too: the same lines, except that `call.retry` had no `call_id` (the drift that
made every real trace count 0 retries); it is recovered from the retry's envelope, whose
`node_id` is the call's own "llm" node, named by that call's `call.start`.

Prompt and output text are not in events unless the engine was asked to put them there
(the `text` field of `call.finish`); `TraceWriter(redact=("text",))` drops them anyway.

    with TraceWriter("traces/") as trace:
        result = await rlm.acompletion(context, root_prompt, event_sinks=[trace])
    summary = load_trace(trace.paths[query_id]).summarize()

A sink runs on the event loop, on every event, so the writer does as little as it can
there: it keeps the event (the `Event` itself, not yet a line) and returns. Lines are made
and written in batches, when a second has passed since the last write (checked as events
arrive), when `max_buffered` events are waiting, at the query's `query.finish`, at
`close()`, and when an unclosed writer is collected or the interpreter exits normally.

Durability: a trace is a diagnostic, not a journal. A process killed hard (SIGKILL,
`os._exit`, a crash of the interpreter) loses the events not yet written, up to a second's
or `max_buffered` events' worth; what is on disk is still a valid trace, perhaps with half a
last line. An event is serialised when its batch is written, which is safe because events
are frozen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import NoneType, TracebackType, UnionType
from typing import IO, Any, get_args, get_type_hints

import orjson
import structlog

from ._events import ENVELOPE, EVENT_TYPES, CallRetry, CallStart, Event, payload_fields
from ._trace_summary import (
    CallSpan,
    CellSpan,
    NodeSpan,
    PathStep,
    TraceSummary,
    summarize,
)
from .exceptions import ConfigError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "CallSpan",
    "CellSpan",
    "NodeSpan",
    "PathStep",
    "Trace",
    "TraceSummary",
    "TraceWriter",
    "UnknownKind",
    "event_from_json",
    "event_to_json",
    "load_trace",
    "summarize",
    "write_trace",
]

FORMAT = "rlm_async.trace"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Versions this reader reads: 1 is upgraded as it is read (see the module docstring)."""

_log = structlog.get_logger("rlm_async.trace")
_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]")


def _jsonable(value: Any) -> Any:
    # Fields are meant to be plain data; anything else (an exception, a Path) is kept as
    # its text rather than failing the whole line.
    return str(value)


# Built once: `json.dumps` with any option set builds a new encoder for every call. No
# circular check: fields are plain data, and a self-containing value fails with
# RecursionError instead of ValueError (either way, that event is left out).
_encode = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, default=_jsonable, check_circular=False
).encode


def event_to_json(event: Event, *, redact: frozenset[str] = frozenset()) -> str:
    """One trace line (without the newline) for `event`.

    orjson writes it (about three times faster than `json`: a traced fan-out of 5,000
    writes 35,000 lines from the event loop); what orjson refuses (a lone surrogate in an
    error text, an integer over 64 bits, a non-string key) falls back to `json`, which
    writes the same line for everything else."""
    fields = event.payload()
    if redact and not redact.isdisjoint(fields):
        fields = {k: v for k, v in fields.items() if k not in redact}
    line = {
        "kind": event.kind,
        "time": event.time,
        "query_id": event.query_id,
        "node_id": event.node_id,
        "depth": event.depth,
        "fields": fields,
    }
    try:
        return orjson.dumps(line, default=_jsonable).decode("utf-8")
    except TypeError:  # orjson.JSONEncodeError is one
        return _encode(line)


def _event_lines(events: list[Event], redact: frozenset[str]) -> str:
    """`events` as trace lines, each ending in a newline. An event that cannot be written
    (a field whose `str()` raises, say) is left out and logged; the others are kept."""
    try:
        lines = [event_to_json(event, redact=redact) for event in events]
    except Exception:
        lines = []
        for event in events:
            try:
                lines.append(event_to_json(event, redact=redact))
            except Exception:
                _log.exception("trace: an event could not be serialised; left out", event_kind=event.kind)
    lines.append("")
    return "\n".join(lines)


class UnknownKind(ValueError):
    """A well-formed line of an event kind this reader does not know."""


def _runtime_types(annotation: Any) -> tuple[type, ...]:
    """The JSON-decoded Python types a field annotated `annotation` accepts."""
    if isinstance(annotation, UnionType):
        return tuple(t for arg in get_args(annotation) for t in _runtime_types(arg))
    if annotation is NoneType or annotation is None:
        return (NoneType,)
    if annotation is float:
        return (float, int)  # JSON writes 3.0 as 3.0, but a hand-made trace may say 3
    if annotation in (int, str, bool):
        return (annotation,)
    raise TypeError(f"event field type {annotation!r} has no JSON form: add it to _runtime_types")


_Field = tuple[str, tuple[type, ...], bool]
"""(name, accepted types, required)"""


def _schema(cls: type[Event]) -> tuple[_Field, ...]:
    hints = get_type_hints(cls)
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    return tuple((name, _runtime_types(hints[name]), name in required) for name in payload_fields(cls))


_SCHEMAS: dict[str, tuple[type[Event], tuple[_Field, ...]]] = {
    kind: (cls, _schema(cls)) for kind, cls in EVENT_TYPES.items()
}


def event_from_json(line: str) -> Event:
    """The typed event a (current version) trace line holds. `UnknownKind` for a kind this
    reader does not know; `ValueError` if the line is not an event, or a field does not fit
    its class."""
    return _event(*_parse(line))


def _parse(line: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A line's JSON object and its `fields`; `ValueError` if it has not that shape."""
    data = json.loads(line)
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
        raise ValueError("not a trace event line")
    fields = data.get("fields") or {}
    if not isinstance(fields, dict):
        raise ValueError("`fields` is not an object")
    return data, fields


def _event(data: dict[str, Any], fields: dict[str, Any]) -> Event:
    kind = data["kind"]
    found = _SCHEMAS.get(kind)
    if found is None:
        raise UnknownKind(f"unknown event kind {kind!r}")
    cls, schema = found
    t = data.get("time")
    if not isinstance(t, int | float) or isinstance(t, bool) or not math.isfinite(t):
        raise ValueError("`time` is not a finite number")
    envelope = {name: data.get(name) for name in ENVELOPE[1:]}
    for name in ("query_id", "node_id"):
        if not isinstance(envelope[name], str | NoneType):
            raise ValueError(f"`{name}` is not a string")
    if not isinstance(envelope["depth"], int) or isinstance(envelope["depth"], bool):
        envelope["depth"] = None
    payload: dict[str, Any] = {}
    for name, types, required in schema:
        if name not in fields:
            if required:
                raise ValueError(f"{kind} without its `{name}`")
            continue
        value = fields[name]
        # bool is an int to isinstance: an int field must not take true/false.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"{kind}.{name} is {value!r}, not of the event's type")
        payload[name] = float(value) if float in types and type(value) is int else value
    return cls(time=float(t), **envelope, **payload)


def _upgrade_v1(data: dict[str, Any], fields: dict[str, Any], call_of_node: dict[str, str]) -> None:
    """Version 1 to 2, in place: name the call of a `call.retry` (see the module docstring)."""
    kind = data.get("kind")
    node_id = data.get("node_id")
    if kind == CallStart.kind and isinstance(node_id, str) and isinstance(fields.get("call_id"), str):
        call_of_node[node_id] = fields["call_id"]
    elif kind == CallRetry.kind and "call_id" not in fields and isinstance(node_id, str):
        call_id = call_of_node.get(node_id)
        if call_id is not None:
            fields["call_id"] = call_id


def _header(query_id: str | None, clock_origin: float, redact: frozenset[str]) -> str:
    return json.dumps(
        {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "query_id": query_id,
            "created_unix": time.time(),
            "clock_origin": clock_origin,
            "redacted": sorted(redact),
        },
        separators=(",", ":"),
    )


class TraceWriter:
    """An event sink that writes `DIRECTORY/<query_id>.jsonl`, one file per query.

    A file that exists already is never overwritten: the next free name is taken
    (`q1-2.jsonl`, `q1-3.jsonl`, …), and so is a new one when a `query.start` reuses the id
    of a query this writer has finished. Two queries in flight at once under the same id
    cannot be told apart and share a file: ids must be unique among concurrent queries.

    Events emitted outside any query (no `query_id`) have no file to go to and are only
    counted, in `unbound_events`. A file is complete and closed at its query's
    `query.finish`; an event of that query arriving later is appended to it. Before that,
    events wait in memory and are written in batches: at most `flush_interval_s` seconds
    (on `clock`, checked as events arrive) or `max_buffered` events after the last write.
    That is what a hard kill of the process can lose (see the module docstring). Not
    thread-safe: like every sink, it is called on the event loop's thread.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        redact: Iterable[str] = (),
        flush_interval_s: float = 1.0,
        max_buffered: int = 512,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = Path(directory)
        self.redact = frozenset(redact)
        self.paths: dict[str, Path] = {}
        """query_id -> the file its events went to (the latest, if the id was reused)."""
        self.unbound_events = 0
        self._files: dict[str, IO[str]] = {}
        self._pending: dict[str, list[Event]] = {}
        """Open queries (the same keys as `_files`) -> their events not yet written."""
        self._buffered = 0
        self._failed: set[str] = set()
        self._flush_interval_s = flush_interval_s
        self._max_buffered = max_buffered
        self._clock = clock
        self._last_flush = clock()
        # Not a reference to self: the writer can still be collected, and then this runs.
        weakref.finalize(self, _write_and_close, self._pending, self._files, self.redact)

    def _create(self, query_id: str) -> tuple[Path, IO[str]]:
        """A new file for the query: `<id>.jsonl`, or `<id>-2.jsonl`, ... where that name is
        taken. Opened with "x", so another writer's file is never clobbered; the directory
        is made only when the open finds it missing (one system call per query, not three,
        for a service opening a file per query)."""
        stem = _UNSAFE_FILENAME.sub("_", query_id)
        n, made = 1, False
        while True:
            path = self.directory / (f"{stem}.jsonl" if n == 1 else f"{stem}-{n}.jsonl")
            try:
                return path, path.open("x", encoding="utf-8", errors="backslashreplace")
            except FileExistsError:
                n += 1
            except FileNotFoundError:
                if made:
                    raise
                self.directory.mkdir(parents=True, exist_ok=True)
                made = True

    def __call__(self, event: Event) -> None:
        # The common case costs a dict lookup and an append; the rest is in `flush`.
        query_id = event.query_id
        if query_id is None:
            self.unbound_events += 1
            return
        pending = self._pending.get(query_id)
        if pending is None:
            pending = self._start(query_id, event)
            if pending is None:
                return
        pending.append(event)
        if event.kind == "query.finish":
            self._close_one(query_id)
            return
        self._buffered += 1
        if self._buffered >= self._max_buffered or self._clock() - self._last_flush >= self._flush_interval_s:
            self.flush()

    def _start(self, query_id: str, event: Event) -> list[Event] | None:
        """Open the file of a query that has none open; its pending list, or None to drop the event."""
        fresh = event.kind == "query.start"
        if fresh:
            self._failed.discard(query_id)
        elif query_id in self._failed:
            return None
        try:
            self._open(query_id, event.time, fresh=fresh)
        except OSError:
            self._fail(query_id)
            return None
        return self._pending[query_id]

    def _open(self, query_id: str, clock_origin: float, *, fresh: bool) -> None:
        path = self.paths.get(query_id)
        handle: IO[str]
        if path is not None and not fresh:  # a straggler after query.finish: no second header
            handle = path.open("a", encoding="utf-8", errors="backslashreplace")
        else:
            path, handle = self._create(query_id)
            handle.write(_header(query_id, clock_origin, self.redact) + "\n")
            self.paths[query_id] = path
        self._files[query_id] = handle
        self._pending[query_id] = []

    def _fail(self, query_id: str) -> None:
        # A full disk must not end the run, nor log once per event: give up on this
        # query's trace, say so once.
        _log.exception("trace write failed; tracing stopped for this query", query_id=query_id)
        self._failed.add(query_id)
        self._pending.pop(query_id, None)
        handle = self._files.pop(query_id, None)
        if handle is not None:
            try:
                handle.close()
            except OSError:
                pass  # the buffer it could not write: said above

    def _close_one(self, query_id: str) -> None:
        handle = self._files.get(query_id)
        if handle is None:
            return
        pending = self._pending[query_id]
        try:
            if pending:
                handle.write(_event_lines(pending, self.redact))
            handle.close()
        except OSError:
            self._fail(query_id)
            return
        del self._files[query_id], self._pending[query_id]

    def flush(self) -> None:
        """Write every buffered event, and hand the files' buffers to the operating system."""
        self._last_flush = self._clock()
        self._buffered = 0
        for query_id, pending in list(self._pending.items()):
            try:
                if pending:
                    self._files[query_id].write(_event_lines(pending, self.redact))
                    pending.clear()
                self._files[query_id].flush()
            except OSError:
                self._fail(query_id)

    def close(self) -> None:
        """Write what is buffered and close every file. Events that come later reopen theirs."""
        for query_id in list(self._files):
            self._close_one(query_id)

    def __enter__(self) -> TraceWriter:
        # Checked here, before any query spends anything: a directory that cannot be made or
        # written to would otherwise show only as an error logged for each query's trace.
        if self.directory.exists() and not self.directory.is_dir():
            raise ConfigError(
                f"cannot write traces to {self.directory}: it is a file; traces go in a directory"
            )
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot write traces to {self.directory}: {exc.strerror or exc}") from None
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise ConfigError(f"cannot write traces to {self.directory}: permission denied")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _write_and_close(
    pending: dict[str, list[Event]], files: dict[str, IO[str]], redact: frozenset[str]
) -> None:
    # A writer collected, or the interpreter exiting, without close(): what a file object
    # would do, write its buffer and close. Quietly: there is nobody left to tell.
    for query_id, handle in list(files.items()):
        try:
            events = pending.pop(query_id, None)
            if events:
                handle.write(_event_lines(events, redact))
            handle.close()
        except (OSError, ValueError):
            pass
    files.clear()


def write_trace(
    events: Iterable[Event],
    path: str | os.PathLike[str],
    *,
    redact: Iterable[str] = (),
) -> Path:
    """Write `events` to one trace file at `path` (whatever their queries); returns the path."""
    path = Path(path)
    drop = frozenset(redact)
    iterator = iter(events)
    first = next(iterator, None)
    with path.open("w", encoding="utf-8", errors="backslashreplace") as handle:
        origin = first.time if first is not None else 0.0
        handle.write(_header(first.query_id if first else None, origin, drop) + "\n")
        if first is not None:
            handle.write(event_to_json(first, redact=drop) + "\n")
        for event in iterator:
            handle.write(event_to_json(event, redact=drop) + "\n")
    return path


@dataclass(frozen=True, slots=True)
class Trace:
    """A loaded trace file."""

    header: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    bad_lines: int = 0
    """Lines that were not valid events (usually one, cut short when the writer died)."""
    unknown_events: int = 0
    """Events of kinds this reader does not know (from a newer writer), left out."""

    @property
    def version(self) -> int:
        """The format version the file was written in (its events are read as the current one)."""
        return int(self.header["version"])

    def summarize(self) -> TraceSummary:
        return summarize(self.events)


def _lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                yield line


def load_trace(path: str | os.PathLike[str]) -> Trace:
    """Read a trace file. `ValueError` if it is not one, or its version is not one this
    reader reads (newer: upgrade rlm_async)."""
    path = Path(path)
    lines = _lines(path)
    first = next(lines, None)
    try:
        header = json.loads(first) if first is not None else None
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path} is not an rlm_async trace: its first line is not a {FORMAT} header")
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise ValueError(
            f"{path} is trace format version {version!r}; this rlm_async reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (up to version {FORMAT_VERSION})"
            + (": upgrade rlm_async to read it" if newer else "")
        )
    events: list[Event] = []
    bad = unknown = 0
    call_of_node: dict[str, str] = {}
    for line in lines:
        try:
            data, fields = _parse(line)
            if version == 1:
                _upgrade_v1(data, fields, call_of_node)
            events.append(_event(data, fields))
        except UnknownKind:
            unknown += 1
        except ValueError:  # JSONDecodeError is a ValueError
            bad += 1
    return Trace(header=header, events=events, bad_lines=bad, unknown_events=unknown)
