"""Synthetic event streams that mimic a query, for the observability tests.

`standard_run()` builds one query whose shape, timings and totals are known in advance:

    root (rlm, depth 0, "big")
    ├─ iteration 1: root call r1 (1.0 s), then a cell fanning out N sub-calls s0..s{N-1}
    │               (depth 1, "small", overlapping); s42 is the slowest (2.5 s), s7 fails
    ├─ iteration 2: root call r2, then a cell starting, concurrently,
    │     ├─ child RLM k1 (depth 1): call k1r1, a cell with 5 sub-calls (k1s4 slowest), call k1r2
    │     └─ 3 short sub-calls t0..t2 (depth 1)
    └─ iteration 3: root call r3, whose text is "FINAL(42)"

So the critical path's calls are r1, c42, r2, k1r1, k1s4, k1r2, r3 (see CRITICAL_CALLS).
Times start at an arbitrary engine-clock origin (T0) to check that summaries are relative.

Two styles of the same run, because the engine is free to choose either:
- engine_style=True (what rlm_async's engine does): every model call, root calls included,
  gets its own "llm" node, and a call's node finishes just before its `call.finish`.
- engine_style=False: root calls are made on the RLM node itself, and a sub-call's node
  finishes just after its `call.finish`.
Either way an event names its node in the envelope (the typed events have no other place).

Hand-built on purpose: the summary's critical path and the progress display are checked
against one precise timing, which no real run reproduces. Tests of what the engine emits
capture a real run's events instead (`rlm_async.testing.capture_events`).

`query_start(...)` and the other small constructors build single typed events for unit
tests of the trace writer and the sinks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlm_async._events import (
    CallFinish,
    CallRetry,
    CallStart,
    CellFinish,
    CellStart,
    Event,
    IterationFinish,
    IterationStart,
    NodeFinish,
    NodeStart,
    QueryFinish,
    QueryStart,
)

T0 = 5000.0
QUERY_ID = "q-test"
PRICES = {"big": (2e-6, 0.5e-6, 8e-6), "small": (0.2e-6, 0.05e-6, 0.8e-6)}
"""Per token: uncached prompt, cached prompt, completion."""
CRITICAL_CALLS = ("r1", "c42", "r2", "k1r1", "k1s4", "k1r2", "r3")


def cost(model: str, prompt: int, cached: int, completion: int) -> float:
    fresh, hit, out = PRICES[model]
    return (prompt - cached) * fresh + cached * hit + completion * out


@dataclass
class RunBuilder:
    """Collects events with explicit times (seconds after T0); `events()` sorts them."""

    query_id: str = QUERY_ID
    engine_style: bool = True
    _events: list[Event] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    """What each call recorded, for tests to total independently of the summary."""
    depth_of: dict[str, int] = field(default_factory=dict)

    def emit(self, kind: type[Event], t: float, *, node: str | None = None, **fields: Any) -> None:
        depth = self.depth_of.get(node) if node is not None else None
        self._events.append(kind(time=T0 + t, query_id=self.query_id, node_id=node, depth=depth, **fields))

    def query_start(self, t: float, *, budget_usd: float | None = None) -> None:
        self.emit(
            QueryStart,
            t,
            context_type="str",
            context_chars=100_000,
            root_prompt_chars=40,
            max_depth=2,
            budget_usd=budget_usd,
        )

    def node_start(
        self, t: float, node_id: str, parent: str | None, depth: int, kind: str, model: str
    ) -> None:
        self.depth_of[node_id] = depth
        label = kind if self.engine_style else node_id
        self.emit(NodeStart, t, node=node_id, parent_id=parent, node_kind=kind, model=model, label=label)

    def node_finish(self, t: float, node_id: str, *, status: str = "ok", error: str | None = None) -> None:
        self.emit(NodeFinish, t, node=node_id, status=status, error=error)

    def llm(
        self,
        t: float,
        latency: float,
        call_id: str,
        node_id: str,
        parent: str,
        depth: int,
        kind: str,
        model: str,
        **call: Any,
    ) -> float:
        """An "llm" node making one call; returns when both have finished."""
        self.node_start(t, node_id, parent, depth, "llm", model)
        end = self._call(t + 0.0002, latency, call_id, node_id, parent, kind, model, **call)
        status, error = call.get("status", "ok"), call.get("error")
        # The engine closes the node, then emits call.finish.
        node_end = end - 1e-6 if self.engine_style else end + 0.0001
        self.node_finish(node_end, node_id, status=status, error=error)
        return max(end, node_end)

    def root_call(
        self, t: float, latency: float, call_id: str, rlm: str, kind: str, model: str, **call: Any
    ) -> float:
        """A turn of the RLM loop `rlm`: on a node of its own in engine style, else on `rlm` itself."""
        if self.engine_style:
            return self.llm(t, latency, call_id, f"{call_id}.n", rlm, self.depth_of[rlm], kind, model, **call)
        return self._call(t, latency, call_id, rlm, None, kind, model, **call)

    def _call(
        self,
        t: float,
        latency: float,
        call_id: str,
        node_id: str,
        parent_id: str | None,
        kind: str,
        model: str,
        *,
        prompt: int,
        cached: int = 0,
        completion: int = 50,
        status: str = "ok",
        error: str | None = None,
        text: str | None = None,
        retries: int = 0,
    ) -> float:
        ok = status == "ok"
        usd = cost(model, prompt, cached, completion) if ok else 0.0
        self.emit(
            CallStart,
            t,
            node=node_id,
            call_id=call_id,
            parent_id=parent_id if parent_id is not None else node_id,
            call_kind=kind,
            model=model,
            prompt_chars=prompt * 4,
        )
        for attempt in range(1, retries + 1):
            self.emit(
                CallRetry,
                t + latency * attempt / (retries + 2),
                node=node_id,
                call_id=call_id,
                attempt=attempt,
                error="RateLimited: 429",
                wait_s=0.01,
                model=model,
                endpoint="scripted://",
            )
        finish: dict[str, Any] = dict(
            call_id=call_id,
            status=status,
            prompt_tokens=prompt if ok else 0,
            cached_tokens=cached if ok else 0,
            completion_tokens=completion if ok else 0,
            cost_usd=usd,
            latency_s=latency,
            attempts=retries + 1,
            from_journal=False,
            error=error,
        )
        if text is not None:
            finish["text"] = text
        self.emit(CallFinish, t + latency, node=node_id, **finish)
        self.calls.append(
            dict(
                call_id=call_id,
                model=model,
                depth=self.depth_of[node_id],
                status=status,
                prompt=finish["prompt_tokens"],
                cached=finish["cached_tokens"],
                completion=finish["completion_tokens"],
                cost=usd,
            )
        )
        return t + latency

    def cell(self, t: float, t_end: float, rlm: str, iteration: int) -> None:
        self.emit(CellStart, t, node=rlm, iteration=iteration, cell=0)
        self.emit(
            CellFinish,
            t_end,
            node=rlm,
            iteration=iteration,
            cell=0,
            duration_s=t_end - t,
            status="ok",
            stdout_chars=10,
            stderr_chars=0,
            error=None,
        )

    def iteration(self, t: float, t_end: float, rlm: str, iteration: int) -> None:
        self.emit(IterationStart, t, node=rlm, iteration=iteration)
        self.emit(IterationFinish, t_end, node=rlm, iteration=iteration, duration_s=t_end - t)

    def events(self) -> list[Event]:
        # Stable: events at the same instant keep the order they were emitted in.
        return sorted(self._events, key=lambda e: e.time)


def _sub_latency(i: int) -> float:
    if i == 42:
        return 2.5
    return 0.4 + (i % 10) * 0.1


def standard_run(
    n_sub: int = 100,
    *,
    engine_style: bool = True,
    budget_usd: float | None = 1.0,
    finish: bool = True,
) -> RunBuilder:
    """The run drawn in the module docstring; `finish=False` cuts it before iteration 3."""
    assert n_sub > 42, "s42 is the designated slowest sub-call"
    b = RunBuilder(engine_style=engine_style)
    b.query_start(0.0, budget_usd=budget_usd)
    b.node_start(0.001, "root", None, 0, "rlm", "big")

    # iteration 1: r1, then a cell fanning out n_sub sub-calls
    t = b.root_call(0.01, 1.0, "r1", "root", "root", "big", prompt=2000, completion=300)
    cell_start = t + 0.01
    ends = []
    for i in range(n_sub):
        failed = i == 7
        ends.append(
            b.llm(
                cell_start + 0.01 + i * 0.0005,
                _sub_latency(i),
                f"c{i}",
                f"s{i}",
                "root",
                1,
                "sub",
                "small",
                prompt=500,
                cached=100 if i % 2 else 0,
                status="error" if failed else "ok",
                error="RateLimited: 429" if failed else None,
                retries=2 if failed else 0,
            )
        )
    cell_end = max(ends) + 0.01
    b.cell(cell_start, cell_end, "root", 1)
    b.iteration(0.002, cell_end + 0.001, "root", 1)

    # iteration 2: r2, then a cell running child RLM k1 beside 3 short sub-calls
    it2 = cell_end + 0.002
    t = b.root_call(it2 + 0.001, 0.8, "r2", "root", "root", "big", prompt=2600, cached=2000, completion=200)
    cell_start = t + 0.01
    k_start = cell_start + 0.01
    b.node_start(k_start, "k1", "root", 1, "rlm", "small")
    t = b.root_call(k_start + 0.002, 0.5, "k1r1", "k1", "child", "small", prompt=800, completion=100)
    k_cell = t + 0.005
    k_ends = [
        b.llm(
            k_cell + 0.005 + j * 0.001,
            0.2 + 0.1 * j,
            f"k1s{j}",
            f"k1n{j}",
            "k1",
            2,
            "sub",
            "small",
            prompt=300,
        )
        for j in range(5)
    ]
    k_cell_end = max(k_ends) + 0.005
    b.cell(k_cell, k_cell_end, "k1", 1)
    b.iteration(k_start + 0.001, k_cell_end + 0.001, "k1", 1)
    t = b.root_call(k_cell_end + 0.003, 0.3, "k1r2", "k1", "child", "small", prompt=900, cached=800)
    b.iteration(k_cell_end + 0.002, t + 0.001, "k1", 2)
    k_end = t + 0.002
    b.node_finish(k_end, "k1")
    for j in range(3):
        b.llm(k_start + 0.001 * (j + 1), 0.5, f"t{j}", f"tn{j}", "root", 1, "sub", "small", prompt=400)
    cell_end = k_end + 0.01
    b.cell(cell_start, cell_end, "root", 2)
    b.iteration(it2, cell_end + 0.001, "root", 2)
    if not finish:
        return b

    # iteration 3: r3 answers
    it3 = cell_end + 0.002
    t = b.root_call(
        it3 + 0.001,
        0.6,
        "r3",
        "root",
        "root",
        "big",
        prompt=3000,
        cached=2600,
        completion=100,
        text="FINAL(42)",
    )
    b.iteration(it3, t + 0.001, "root", 3)
    b.node_finish(t + 0.002, "root")
    wall = t + 0.003
    b.emit(
        QueryFinish,
        wall,
        status="ok",
        wall_s=wall,
        calls=len(b.calls),
        prompt_tokens=sum(c["prompt"] for c in b.calls),
        cached_tokens=sum(c["cached"] for c in b.calls),
        completion_tokens=sum(c["completion"] for c in b.calls),
        cost_usd=sum(c["cost"] for c in b.calls),
    )
    return b


# -- single events, for unit tests of the writer and the sinks ----------------------------


def query_start(t: float, query_id: str | None = "q", *, budget_usd: float | None = None) -> QueryStart:
    return QueryStart(
        time=t,
        query_id=query_id,
        context_type="str",
        context_chars=0,
        root_prompt_chars=0,
        max_depth=1,
        budget_usd=budget_usd,
    )


def query_finish(
    t: float, query_id: str | None = "q", *, status: str = "ok", wall_s: float = 1.0
) -> QueryFinish:
    return QueryFinish(time=t, query_id=query_id, status=status, wall_s=wall_s)


def node_start(
    t: float,
    query_id: str | None = "q",
    node_id: str = "root",
    *,
    parent_id: str | None = None,
    depth: int = 0,
    node_kind: str = "rlm",
    model: str = "m",
) -> NodeStart:
    return NodeStart(
        time=t,
        query_id=query_id,
        node_id=node_id,
        depth=depth,
        parent_id=parent_id,
        node_kind=node_kind,
        model=model,
        label=node_id,
    )


def node_finish(
    t: float, query_id: str | None = "q", node_id: str = "root", *, depth: int = 0, status: str = "ok"
) -> NodeFinish:
    return NodeFinish(time=t, query_id=query_id, node_id=node_id, depth=depth, status=status)


def call_start(t: float, call_id: str, query_id: str | None = "q", *, node_id: str = "n1") -> CallStart:
    return CallStart(
        time=t,
        query_id=query_id,
        node_id=node_id,
        depth=1,
        call_id=call_id,
        parent_id="root",
        call_kind="sub",
        model="m",
        prompt_chars=4,
    )


def call_finish(
    t: float, call_id: str, query_id: str | None = "q", *, node_id: str = "n1", **fields: Any
) -> CallFinish:
    values: dict[str, Any] = dict(
        status="ok",
        prompt_tokens=1,
        cached_tokens=0,
        completion_tokens=1,
        cost_usd=0.0,
        latency_s=0.0,
        attempts=1,
        from_journal=False,
    )
    values.update(fields)
    return CallFinish(time=t, query_id=query_id, node_id=node_id, depth=1, call_id=call_id, **values)
