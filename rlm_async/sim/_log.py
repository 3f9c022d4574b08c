"""The request log: one record per chat-completion request, in memory and as JSONL.

Times are `time.monotonic()` seconds (the server's injected clock). On Linux that clock is
system-wide, so a benchmark can line up the log of a server in another process with its
own timestamps. Records are appended when a request finishes, so the list is in finish
order; `seq` is the arrival order. A request is logged just before its response is sent, so
a client that holds a response finds its entry; a request the client abandoned is logged
when the server notices the disconnect (`wait_for` waits for that).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

import anyio
import orjson

from .._governor import ModelPrice
from .._types import Usage

__all__ = ["LogEntry", "LogTail", "RequestLog", "priced"]

SERVED_OUTCOMES = frozenset({"ok", "slow"})


@dataclass(frozen=True, slots=True, kw_only=True)
class LogEntry:
    id: str
    """The response's `id` and `x-request-id`."""
    seq: int
    """Arrival order, from 0."""
    arrival: float
    """When the request reached the app (before its body was read)."""
    start: float | None
    """When service began (after any capacity queue); `None` if it was refused first."""
    finish: float
    """When the model finished (its capacity slot freed, just before the response is sent),
    or when the request was refused or the client went away."""
    kind: str
    """"root", "sub" or "other", from the system prompt."""
    model: str | None
    status: int
    """HTTP status sent; 0 when no complete response was sent (dropped, client gone)."""
    outcome: str
    """"ok", "slow", "drop", "malformed", "error_500", "error_429", "rate_limited",
    "cancelled" (the client disconnected first), "bad_request", "unauthorized",
    "not_found", "context_length"."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    max_tokens: int | None = None
    in_flight: int = 0
    """Requests inside the server when this one arrived, itself included."""
    finish_reason: str | None = None
    prompt_cache_key: str | None = None
    policy: str | None = None
    modeled_s: float | None = None
    """The service time the latency model drew for this request, jitter included (and a
    "slow" fault's extra time): what `finish - start` would be on an idle, infinitely fast
    server. `None` when the request was refused before service. The excess of the logged
    `finish - start` over it is the simulator's own lag."""
    body_sha256: str | None = None
    """Hex SHA-256 of the request body as received: equal for byte-identical requests, so
    a test can tell which requests of a re-run repeat ones an earlier run already sent."""
    body: dict[str, Any] | None = None
    """The request's JSON body as parsed, when `SimConfig.record_bodies` is on."""

    @property
    def latency_s(self) -> float:
        return self.finish - self.arrival

    @property
    def queue_s(self) -> float:
        return 0.0 if self.start is None else self.start - self.arrival

    @property
    def served(self) -> bool:
        """Whether the model ran (a dropped or malformed reply was still served)."""
        return self.start is not None and self.outcome not in ("cancelled",)

    def to_dict(self) -> dict[str, Any]:
        # Field by field, not `asdict`, which deep-copies (the recorded body too): 1 us
        # against 13 us, once per request. The body is shared, not copied.
        return {name: getattr(self, name) for name in _FIELD_NAMES}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LogEntry:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


_FIELD_NAMES = tuple(f.name for f in fields(LogEntry))


def _json_line(entry: LogEntry) -> str:
    """One JSONL line: orjson (a tenth of `json`'s time, once per request) for an entry
    without a recorded body, whose fields are our own strings, ints and finite floats;
    `json` for a recorded body, which may hold what orjson writes differently (NaN) or
    refuses (a lone surrogate, an integer over 64 bits), and for a request's own model name
    or cache key that orjson refuses."""
    record = entry.to_dict()
    if entry.body is None:
        with contextlib.suppress(TypeError):
            return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE).decode()
    return json.dumps(record, separators=(",", ":")) + "\n"


class RequestLog:
    """Every request a server saw. Append-only while the server runs."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.entries: list[LogEntry] = []
        self.path = Path(path) if path is not None else None
        self._file: IO[str] | None = None
        self._grew: anyio.Event | None = None

    def append(self, entry: LogEntry) -> None:
        self.entries.append(entry)
        if self._grew is not None:
            self._grew.set()
            self._grew = None
        if self.path is not None:
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8")  # held open: one line per request
            # Flushed per line: a reader in another process sees each request as it finishes.
            self._file.write(_json_line(entry))
            self._file.flush()

    async def wait_for(self, count: int) -> None:
        """Wait until at least `count` requests are logged (wrap it in `anyio.fail_after`)."""
        while len(self.entries) < count:
            if self._grew is None:
                self._grew = anyio.Event()
            await self._grew.wait()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def clear(self) -> None:
        self.entries.clear()

    @classmethod
    def load(cls, path: str | Path) -> RequestLog:
        """Read a JSONL log written by a server (possibly still running)."""
        log = cls()
        p = Path(path)
        if p.exists():
            for line in p.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    try:
                        log.entries.append(LogEntry.from_dict(json.loads(line)))
                    except json.JSONDecodeError:  # a line being written right now
                        continue
        return log

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[LogEntry]:
        return iter(self.entries)

    # ------------------------------------------------------------ queries

    def by_arrival(self) -> list[LogEntry]:
        return sorted(self.entries, key=lambda e: e.seq)

    def of_kind(self, kind: str) -> list[LogEntry]:
        return [e for e in self.entries if e.kind == kind]

    def with_outcome(self, *outcomes: str) -> list[LogEntry]:
        return [e for e in self.entries if e.outcome in outcomes]

    def ok(self) -> list[LogEntry]:
        """Requests answered with a well-formed 200."""
        return [e for e in self.entries if e.outcome in SERVED_OUTCOMES]

    def max_in_flight(self, kind: str | None = None) -> int:
        """The most requests the server held at once, as counted at each arrival."""
        return max((e.in_flight for e in self.entries if kind is None or e.kind == kind), default=0)

    def peak_concurrency(self, *, phase: str = "service", kind: str | None = None) -> int:
        """The most requests overlapping in time: in service (`start`..`finish`) or anywhere
        in the server (`arrival`..`finish`, phase="request")."""
        points: list[tuple[float, int]] = []
        for e in self.entries:
            if kind is not None and e.kind != kind:
                continue
            begin = e.arrival if phase == "request" else e.start
            if begin is None:
                continue
            points.append((begin, 1))
            points.append((e.finish, -1))
        points.sort()  # at equal times -1 sorts first: a finish frees its slot before a start
        peak = current = 0
        for _, step in points:
            current += step
            peak = max(peak, current)
        return peak

    def totals(self) -> dict[str, int]:
        """Token sums over served requests."""
        served = [e for e in self.entries if e.start is not None]
        return {
            "requests": len(self.entries),
            "prompt_tokens": sum(e.prompt_tokens for e in served),
            "cached_tokens": sum(e.cached_tokens for e in served),
            "completion_tokens": sum(e.completion_tokens for e in served),
        }


class LogTail:
    """Follows a request log that a running server (say a `SimProcess`) is still writing,
    reading only what the JSONL file gained since the last look."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._offset = 0
        self._partial = b""
        self.entries: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        """Read new complete lines; returns every entry seen so far."""
        if self.path.exists():
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
            self._offset += len(data)
            *lines, self._partial = (self._partial + data).split(b"\n")
            self.entries.extend(json.loads(line) for line in lines if line.strip())
        return self.entries

    def answered(self, kind: str = "sub") -> int:
        """Requests of `kind` the server has answered (status 200) so far."""
        return sum(1 for e in self.poll() if e["kind"] == kind and e["status"] == 200)


def priced(entries: Iterable[LogEntry], prices: Mapping[str, ModelPrice]) -> float:
    """Dollars for the requests the server answered (status 200), from the usage it
    reported, at `prices` (cached tokens at the cached-input price)."""
    total = 0.0
    for e in entries:
        if e.status == 200 and e.model is not None:
            usage = Usage(e.prompt_tokens, e.completion_tokens, e.cached_tokens)
            total += float(prices[e.model].cost(usage))
    return total
