# Over 500 lines by design: the whole event schema is one contract, read in one place.
"""Structured events: one frozen dataclass per event kind, the contract between the layers
that emit them and the readers (trace writer and summary, progress display, hooks, HTML
view) that rely on them.

A producer names the event's class and its payload; the envelope (time, query, node,
depth) is filled in by `emit`, and only when a sink listens:

    emit(CallRetry, call_id=call_id, attempt=2, error="RateLimited: 429", wait_s=0.5,
         model=model, endpoint=endpoint)

`emit` is typed with the class's own signature (a `ParamSpec`), so mypy checks the payload
at every call site, and it builds the event only if someone listens: with no sink it costs
a context-variable lookup and a call. A reader matches on the class and reads attributes:

    match event:
        case CallRetry(call_id=call_id): retries[call_id] += 1

Which query, node and depth an event belongs to is carried in context variables, bound
once where a node starts (`bind(...)`) and inherited by every task it spawns (anyio copies
the context into child tasks), so no layer passes ids by hand. For `node.*` events the
envelope's `node_id` and `depth` are those of the node itself (the engine emits them inside
the node's `bind`); for `call.*` events, those of the call's own "llm" node.

Sinks (the trace writer, the live progress display, user hooks) are callables that must
not block; an exception in a sink is logged and swallowed, because observing a run must
never break it. Events are immutable: a sink may keep them.

A "node" is an RLM loop (node_kind "rlm": the query's root and every child RLM) or one
model call (node_kind "llm"), so the tree of nodes is the task tree of the query.

`docs/trace-format.md` lists every kind with its fields; a test checks it against the
classes below, field by field.
"""

from __future__ import annotations

import contextvars
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, ParamSpec, TypeVar, cast

import structlog

__all__ = [
    "ENVELOPE",
    "EVENT_TYPES",
    "BudgetRefuse",
    "BudgetReserve",
    "BudgetSettle",
    "CallFinish",
    "CallHedge",
    "CallHedgeEnd",
    "CallRetry",
    "CallStart",
    "CellFinish",
    "CellStart",
    "Event",
    "EventSink",
    "IterationFinish",
    "IterationStart",
    "JournalHit",
    "LimiterResize",
    "LimiterWait",
    "NodeFinish",
    "NodeStart",
    "PriceUnknown",
    "QueryFinish",
    "QueryStart",
    "RateLimitPause",
    "RootCompacted",
    "SandboxReducedIsolation",
    "ServerDetected",
    "SubcallsRefused",
    "ToolFinish",
    "ToolStart",
    "UsageEstimated",
    "WarmupDecision",
    "WorkerCell",
    "WorkerKill",
    "WorkerSlotWait",
    "WorkerStart",
    "bind",
    "current_ids",
    "emit",
    "listening",
    "payload_fields",
    "sinks",
]

_log = structlog.get_logger("rlm_async")


# --------------------------------------------------------------------------- the envelope


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """What every event carries: when, and in which query, node and depth it was emitted.
    Not emitted itself: each kind is a subclass, with its payload as further fields."""

    kind: ClassVar[str] = ""
    """Dotted name of the kind, e.g. "call.finish": the `kind` of a trace line."""
    time: float = 0.0
    """Engine clock (monotonic seconds; only differences mean something)."""
    query_id: str | None = None
    node_id: str | None = None
    """The node current where the event was emitted (`None` outside a node)."""
    depth: int | None = None

    def payload(self) -> dict[str, Any]:
        """The event's own fields (everything but the envelope), by name."""
        return {name: getattr(self, name) for name in _PAYLOAD[type(self)]}

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "time": self.time,
            "query_id": self.query_id,
            "node_id": self.node_id,
            "depth": self.depth,
            **self.payload(),
        }


ENVELOPE = ("time", "query_id", "node_id", "depth")
"""The envelope's fields, in trace order."""

EventSink = Callable[[Event], None]


# --------------------------------------------------------------------------- query and tree


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryStart(Event):
    """A query began (the first event of every query)."""

    kind: ClassVar[str] = "query.start"
    context_type: str
    """Type name of the context ("str", "list", "dict", ...)."""
    context_chars: int
    root_prompt_chars: int
    max_depth: int
    budget_usd: float | None
    """The query's dollar cap, or `None`."""
    max_in_flight: int | None = None
    """The most requests this process holds in flight at once (the connection cap)."""
    max_in_flight_why: str | None = None
    """Where that cap comes from (the descriptor budget, or a configured limit)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryFinish(Event):
    """A query ended (the last event of every query). The engine's own totals are `None`
    when the query was cancelled from outside, before it could count them."""

    kind: ClassVar[str] = "query.finish"
    status: str
    """The result's status ("ok", "max_iterations", "budget_exceeded", "timeout", "error"),
    or "cancelled"."""
    wall_s: float
    calls: int | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeStart(Event):
    """A node of the call tree opened; the envelope's `node_id` and `depth` are its own."""

    kind: ClassVar[str] = "node.start"
    parent_id: str | None
    """`None` for the query's root."""
    node_kind: str
    """"rlm" (an RLM loop: the root or a child RLM) or "llm" (one model call)."""
    model: str
    label: str
    """For an "llm" node the call's kind (root, sub, child, final); for an RLM, "root" or
    the child's label."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeFinish(Event):
    """A node closed; the envelope names it."""

    kind: ClassVar[str] = "node.finish"
    status: str
    """"ok", "error", "budget", "cancelled" or "timeout"."""
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class IterationStart(Event):
    """A turn of an RLM loop (the envelope's node) began."""

    kind: ClassVar[str] = "iteration.start"
    iteration: int
    """From 1."""


@dataclass(frozen=True, slots=True, kw_only=True)
class IterationFinish(Event):
    """A turn of an RLM loop ended (its root call and its cells ran)."""

    kind: ClassVar[str] = "iteration.finish"
    iteration: int
    duration_s: float


# --------------------------------------------------------------------------- model calls


@dataclass(frozen=True, slots=True, kw_only=True)
class CallStart(Event):
    """A model call began; the envelope names the call's own "llm" node."""

    kind: ClassVar[str] = "call.start"
    call_id: str
    """Unique within the query ("c1", "c2", ...); every `call.*` event of this call names it."""
    parent_id: str
    """The RLM node that made the call."""
    call_kind: str
    """"root" (a turn of the root), "child" (a turn of a child RLM), "final" (the last call
    for an answer) or "sub" (llm_query / llm_batch)."""
    model: str
    prompt_chars: int
    prompt: str | None = None
    """The last message's text, only when the engine was told to log text."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CallRetry(Event):
    """An attempt of a call failed with a retryable error; the next one follows `wait_s` later."""

    kind: ClassVar[str] = "call.retry"
    call_id: str
    """The call retried (a governor used without the engine numbers its calls "g1", "g2", ...)."""
    attempt: int
    """The attempt that failed, from 1."""
    error: str
    wait_s: float
    model: str
    endpoint: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CallFinish(Event):
    """A model call ended, whatever the outcome: paid, failed, refused or cancelled."""

    kind: ClassVar[str] = "call.finish"
    call_id: str
    status: str
    """"ok", "error", "budget" (refused before sending) or "cancelled"."""
    prompt_tokens: int
    cached_tokens: int
    """A subset of `prompt_tokens`, as the provider reports it."""
    completion_tokens: int
    cost_usd: float
    latency_s: float
    attempts: int
    """Attempts sent (0 for a journal hit)."""
    from_journal: bool
    error: str | None = None
    text: str | None = None
    """The reply's text, only when the engine was told to log text."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CallHedge(Event):
    """A hedge copy of a straggling sub-call was ordered (`HedgeConfig`); it passes the
    governor like any call, so the budget may still refuse it (see `CallHedgeEnd`)."""

    kind: ClassVar[str] = "call.hedge"
    call_id: str
    copy: int
    """1 for the first hedge, 2 for the next, ... (0 is the original)."""
    reason: str
    """The policy's rule: "stage", "quantile" or "straggler"."""
    age_s: float
    """How long the call had been running when the copy was ordered."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CallHedgeEnd(Event):
    """One copy of a hedged call ended (the original included, once a hedge was sent)."""

    kind: ClassVar[str] = "call.hedge_end"
    call_id: str
    copy: int
    outcome: str
    """"won", "cancelled" (another copy answered first), "failed", "refused" (the budget
    refused it: not sent) or "late" (answered after the winner, before its cancellation)."""
    prompt_tokens: int
    """Billed by this copy (a cancelled copy: its prompt-token bound)."""
    completion_tokens: int
    cost_usd: float


# --------------------------------------------------------------------------- REPL


@dataclass(frozen=True, slots=True, kw_only=True)
class CellStart(Event):
    """A ```repl block of a reply began running; the envelope names the RLM node."""

    kind: ClassVar[str] = "cell.start"
    iteration: int
    cell: int
    """From 1, within the reply."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CellFinish(Event):
    """A ```repl block finished, however it ended."""

    kind: ClassVar[str] = "cell.finish"
    iteration: int
    cell: int
    duration_s: float
    status: str
    """The worker's status for the cell ("ok", "error", "timeout", "crashed", ...)."""
    stdout_chars: int
    stderr_chars: int
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolStart(Event):
    """The code called a custom tool; it runs in the engine. The envelope names the RLM node."""

    kind: ClassVar[str] = "tool.start"
    tool: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolFinish(Event):
    """A custom tool call ended: "ok", "error" (it raised, or its arguments or result were not
    JSON data) or "cancelled" (the cell ended first)."""

    kind: ClassVar[str] = "tool.finish"
    tool: str
    status: str
    duration_s: float
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerStart(Event):
    """A REPL worker process started, with the context loaded."""

    kind: ClassVar[str] = "worker.start"
    pid: int
    isolated: bool
    """Whether it runs under an isolating tier (any but "none")."""
    tier: str = ""
    """The isolation tier: "bubblewrap", "landlock" or "none" ("" in traces from before tiers)."""
    uid: int | None
    """The user it runs as, when it dropped to a free uid."""
    context_bytes: int
    duration_s: float
    """How long the node waited for it: launch and context loading, or, for a pooled worker,
    loading alone."""
    pooled: bool = False
    """Taken from the pool of pre-started workers (`RLMConfig.worker_pool`), never used before."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSlotWait(Event):
    """An RLM node got its slot under the process-wide cap on live workers (`max_workers`):
    how long it waited, and how many were alive then. Not emitted for a persistent
    session's root worker, whose slot is held for the whole session."""

    kind: ClassVar[str] = "worker.slot"
    waited_s: float
    live: int
    """Workers alive (slots held) once it got its own, itself included."""
    cap: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerKill(Event):
    """A REPL worker's processes were killed (closed, restarted, timed out, cancelled)."""

    kind: ClassVar[str] = "worker.kill"
    pid: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerCell(Event):
    """The worker's side of a cell: how it ended, seen from the sandbox."""

    kind: ClassVar[str] = "worker.cell"
    pid: int | None
    status: str
    duration_s: float
    dropped_output_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxReducedIsolation(Event):
    """No longer emitted: isolation refuses rather than falls back (kept so older traces read)."""

    kind: ClassVar[str] = "sandbox.reduced_isolation"
    reason: str


# --------------------------------------------------------------------------- the governor


@dataclass(frozen=True, slots=True, kw_only=True)
class LimiterWait(Event):
    """A call queued for a concurrency slot, a paused gate or rate-limit capacity before being
    sent; `waited_s` is the time it queued. A call that found them free emits none."""

    kind: ClassVar[str] = "limiter.wait"
    endpoint: str
    model: str
    waited_s: float
    tokens: int
    concurrency: int | None
    """The concurrency limit at that moment (`None`: unlimited)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LimiterResize(Event):
    """The adaptive concurrency limit grew (after successes) or shrank (after congestion)."""

    kind: ClassVar[str] = "limiter.resize"
    endpoint: str
    model: str
    concurrency: int
    reason: str
    """"success", or the error type's name."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitPause(Event):
    """A 429 (or a Retry-After) paused every request to this endpoint+model."""

    kind: ClassVar[str] = "ratelimit.pause"
    endpoint: str
    model: str
    seconds: float
    retry_after: float | None
    status_code: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class PriceUnknown(Event):
    """A model without a known price is counted as $0 (once per model and price table)."""

    kind: ClassVar[str] = "price.unknown"
    model: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetReserve(Event):
    """A call's upper bound was reserved in the budget before sending."""

    kind: ClassVar[str] = "budget.reserve"
    model: str
    input_tokens: int
    output_tokens: int
    usd: float
    calls: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetRefuse(Event):
    """A reservation did not fit a cap: the call is refused before sending."""

    kind: ClassVar[str] = "budget.refuse"
    limit: str
    """The cap crossed, e.g. "total_tokens" or "child.usd"."""
    cap: float
    committed: float
    requested: float
    model: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetSettle(Event):
    """A reservation was replaced by what the call spent (or released, all zero)."""

    kind: ClassVar[str] = "budget.settle"
    model: str
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    usd: float
    calls: int
    refunded_tokens: int
    refunded_usd: float
    overrun: bool
    """The call used more than was reserved."""


# --------------------------------------------------------------------------- cache, journal


@dataclass(frozen=True, slots=True, kw_only=True)
class WarmupDecision(Event):
    """How a fan-out of more than one request is sent for the prefix cache."""

    kind: ClassVar[str] = "warmup.decision"
    decision: str
    """"warm" (one request per cache bucket first) or "skip" (all at once)."""
    reason: str
    prefix_tokens: int
    batch_size: int
    cacheable_tokens: int
    buckets: int
    warmups: int
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerDetected(Event):
    """What a model's server was found to be at its first use, and the settings that follow (each with its source)."""

    kind: ClassVar[str] = "server.detected"
    endpoint: str
    model: str
    server: str
    """"vllm", "sglang", "llamacpp", "llama-cpp-python", "ollama", "openai" or "unknown"."""
    evidence: str
    """What was seen, clauses joined by "; " (`GET /v1/models: owned_by 'vllm'; ...`)."""
    min_cacheable_tokens: int
    step_tokens: int
    warm: str
    """The cache settings' warm-up: "auto", "on" or "off"."""
    send_prompt_cache_key: bool
    cache_source: str
    """"configured", "detected" or "default" (as for the other `*_source` fields)."""
    context_window: int | None
    window_source: str
    """Also "server error": read from the server's `context_length_exceeded` message."""
    max_concurrency: int | None
    limits_source: str
    count_tokens: str | None
    """The server tokenize endpoint that counts prompts, or `None` (the byte bound)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RootCompacted(Event):
    """The root conversation reached its share of the context window and was summarised
    (`RLMConfig.compaction`); the full history stays in the REPL list `history`."""

    kind: ClassVar[str] = "root.compacted"
    count: int
    """Compactions so far in this call (1 for the first)."""
    tokens: int
    """The conversation's estimated prompt tokens when it was summarised."""
    threshold_tokens: int
    context_window: int
    window_source: str
    """"configured", "detected", "server error", or "default" (128,000, as officially)."""
    messages_before: int
    messages_after: int


@dataclass(frozen=True, slots=True, kw_only=True)
class JournalHit(Event):
    """A call was answered without sending: from the journal, or by an identical call in flight."""

    kind: ClassVar[str] = "journal.hit"
    call_id: str | None
    """The engine's call (`None` when the journal is used on its own)."""
    source: str
    """"journal" or "in_flight"."""
    key: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SubcallsRefused(Event):
    """Sub-call prompts refused at admission, before any work: past the calls the budget
    has left, the deadline, or `max_pending_subcalls`. One event for all of them; they are
    counted as refused calls, never made calls."""

    kind: ClassVar[str] = "subcalls.refused"
    model: str
    count: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageEstimated(Event):
    """A server answered without reporting usage: the call is charged its reservation."""

    kind: ClassVar[str] = "usage.estimated"
    endpoint: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    usd: float


# --------------------------------------------------------------------------- the registry

EVENT_TYPES: Mapping[str, type[Event]] = {
    cls.kind: cls
    for cls in (
        QueryStart,
        QueryFinish,
        NodeStart,
        NodeFinish,
        IterationStart,
        IterationFinish,
        CallStart,
        CallRetry,
        CallFinish,
        CallHedge,
        CallHedgeEnd,
        CellStart,
        CellFinish,
        ToolStart,
        ToolFinish,
        WorkerStart,
        WorkerSlotWait,
        WorkerKill,
        WorkerCell,
        SandboxReducedIsolation,
        LimiterWait,
        LimiterResize,
        RateLimitPause,
        PriceUnknown,
        BudgetReserve,
        BudgetRefuse,
        BudgetSettle,
        WarmupDecision,
        ServerDetected,
        RootCompacted,
        JournalHit,
        SubcallsRefused,
        UsageEstimated,
    )
}
"""Every event kind, by its dotted name."""

_PAYLOAD: dict[type[Event], tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls) if f.name not in ENVELOPE)
    for cls in EVENT_TYPES.values()
}


def payload_fields(cls: type[Event]) -> tuple[str, ...]:
    """The names of a kind's own fields, in declaration order."""
    return _PAYLOAD[cls]


def _fast_constructor(cls: type[Event]) -> Callable[..., Event]:
    """`cls(time=, query_id=, node_id=, depth=, **payload)`, for `emit`, in half the time.

    A frozen dataclass's `__init__` sets each field with `object.__setattr__` looked up
    afresh every time; this sets each slot through its descriptor, bound once. Same
    signature, same checks (an unknown or missing field is a TypeError), same result:
    a test compares it with the class's own constructor, kind by kind."""
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    params = [
        name if f.default is dataclasses.MISSING else f"{name}=_default_{name}"
        for name, f in zip(names, fields, strict=True)
    ]
    lines = [f"def make(time, query_id, node_id, depth, *, {', '.join(params[len(ENVELOPE) :])}):"]
    lines.append("    event = _new(_cls)")
    lines += [f"    _set_{name}(event, {name})" for name in names]
    lines.append("    return event")
    scope: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    for f in fields:
        scope[f"_set_{f.name}"] = getattr(cls, f.name).__set__  # the slot's member descriptor
        if f.default is not dataclasses.MISSING:
            scope[f"_default_{f.name}"] = f.default
    exec("\n".join(lines), scope)  # built from our own field names only
    make: Callable[..., Event] = scope["make"]
    return make


_MAKE: dict[type[Event], Callable[..., Event]] = {cls: _fast_constructor(cls) for cls in EVENT_TYPES.values()}


# --------------------------------------------------------------------------- emitting

_Ids = tuple[str | None, str | None, int | None]
# One variable for the three ids, not three: `emit` reads them on every event, `bind` sets
# them on every node, and one get/set costs the same as each of three.
_ids: contextvars.ContextVar[_Ids] = contextvars.ContextVar("rlm_ids", default=(None, None, None))
_sinks: contextvars.ContextVar[tuple[EventSink, ...]] = contextvars.ContextVar("rlm_sinks", default=())
_clock: contextvars.ContextVar[Callable[[], float]] = contextvars.ContextVar(
    "rlm_clock", default=time.monotonic
)

_P = ParamSpec("_P")
_E = TypeVar("_E", bound=Event)


def current_ids() -> tuple[str | None, str | None, int | None]:
    return _ids.get()


def listening() -> bool:
    """Whether an event emitted here would reach a sink: guard work done only for events."""
    return bool(_sinks.get())


class bind:  # lower case: used like a function, as contextlib's context managers are
    """Bind ids for everything emitted inside the block (and in tasks started inside it).

    A class rather than a generator-based context manager: every model call binds its node
    for as long as it runs, and a fan-out of thousands holds them all at once (a generator,
    its frame and contextlib's wrapper each, against one small object here)."""

    __slots__ = ("_ids", "_token")

    def __init__(
        self,
        *,
        query_id: str | None = None,
        node_id: str | None = None,
        depth: int | None = None,
    ) -> None:
        self._ids = (query_id, node_id, depth)
        self._token: contextvars.Token[_Ids] | None = None

    def __enter__(self) -> None:
        query_id, node_id, depth = self._ids
        outer_query, outer_node, outer_depth = _ids.get()
        self._token = _ids.set(
            (
                outer_query if query_id is None else query_id,
                outer_node if node_id is None else node_id,
                outer_depth if depth is None else depth,
            )
        )

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _ids.reset(self._token)
        self._token = None


@contextmanager
def sinks(*new: EventSink, clock: Callable[[], float] | None = None) -> Iterator[None]:
    """Deliver events emitted inside the block to `new` as well as to the enclosing sinks."""
    token = _sinks.set(_sinks.get() + new)
    clock_token = _clock.set(clock) if clock is not None else None
    try:
        yield
    finally:
        _sinks.reset(token)
        if clock_token is not None:
            _clock.reset(clock_token)


def emit(event_type: Callable[_P, _E], /, *args: _P.args, **fields: _P.kwargs) -> _E | None:
    """Build an `event_type` from `fields` (its payload; the envelope is filled in here) and
    send it to the current sinks. With no sink it builds nothing and costs one tuple
    lookup; returns the event, or `None` when nobody listened."""
    targets = _sinks.get()
    if not targets:
        return None
    query_id, node_id, depth = _ids.get()
    # The envelope is this function's to fill: a producer passing `time=` (which mypy, seeing
    # the class's own signature, would let through) fails here with "multiple values".
    now = _clock.get()()
    make = _MAKE.get(cast(type[Event], event_type))
    if make is not None:  # every kind of this module (payload fields are keyword-only)
        event = cast(_E, make(now, query_id, node_id, depth, **fields))
    else:  # an event class defined elsewhere
        build = cast(Callable[..., _E], event_type)
        event = build(*args, time=now, query_id=query_id, node_id=node_id, depth=depth, **fields)
    for sink in targets:
        try:
            sink(event)
        except Exception:  # a broken observer must not break the run
            _log.exception("event sink failed", sink=repr(sink), event_kind=event.kind)
    return event
