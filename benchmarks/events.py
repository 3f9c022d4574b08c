"""What `emit` costs per event, with nobody listening and with one sink.

    python benchmarks/events.py [--number 200000] [--repeat 5]

A 1000-way fan-out emits about six events per sub-call (node.start, call.start,
budget.reserve, budget.settle, node.finish, call.finish), so this is paid thousands of
times per query. Measured for call.finish (the widest kind, 11 payload fields) and
iteration.start (one field): the typed `emit(CallFinish, ...)`, and for comparison a copy
of the untyped emit it replaced (`emit("call.finish", **fields)` building one Event with a
dict of fields) and a call of an empty function with the same arguments (the floor: what
passing the fields costs at all). Best of `--repeat` runs, in nanoseconds per emit. Writes
benchmarks/results/events.json.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import time
import timeit
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _provenance import provenance

from rlm_async import _events
from rlm_async._events import CallFinish, IterationStart

RESULTS = Path(__file__).parent / "results" / "events.json"

FINISH: dict[str, Any] = dict(
    call_id="c17",
    status="ok",
    prompt_tokens=812,
    cached_tokens=640,
    completion_tokens=95,
    cost_usd=0.00031,
    latency_s=1.21,
    attempts=1,
    from_journal=False,
    error=None,
    text=None,
)


# -- the untyped emit this replaced (rlm_async before the typed events), for comparison ---


@dataclass(frozen=True, slots=True)
class _OldEvent:
    kind: str
    time: float
    query_id: str | None
    node_id: str | None
    depth: int | None
    fields: dict[str, Any] = field(default_factory=dict)


_old_sinks: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar("old_sinks", default=())
_old_ids: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar(
    "old_ids", default=(None, None, None)
)
_old_clock: contextvars.ContextVar[Any] = contextvars.ContextVar("old_clock", default=time.monotonic)


def _old_emit(kind: str, **fields: Any) -> _OldEvent | None:
    targets = _old_sinks.get()
    if not targets:
        return None
    query_id, node_id, depth = _old_ids.get()
    event = _OldEvent(kind, _old_clock.get()(), query_id, node_id, depth, fields)
    for sink in targets:
        sink(event)
    return event


def _floor(*args: Any, **fields: Any) -> None:
    return None


def _best(stmt: Any, number: int, repeat: int) -> float:
    return min(timeit.repeat(stmt, number=number, repeat=repeat)) / number * 1e9


def measure(number: int, repeat: int) -> list[dict[str, Any]]:
    kept: list[Any] = []
    rows = []
    cases = [
        ("call.finish", lambda: _events.emit(CallFinish, **FINISH), lambda: _old_emit("call.finish", **FINISH),
         lambda: _floor(CallFinish, **FINISH)),
        ("iteration.start", lambda: _events.emit(IterationStart, iteration=3),
         lambda: _old_emit("iteration.start", iteration=3), lambda: _floor(IterationStart, iteration=3)),
    ]  # fmt: skip
    for kind, typed, old, floor in cases:
        row: dict[str, Any] = {"kind": kind, "floor_ns": round(_best(floor, number, repeat))}
        row["no_sink_typed_ns"] = round(_best(typed, number, repeat))
        row["no_sink_untyped_ns"] = round(_best(old, number, repeat))
        with _events.sinks(kept.append), _events.bind(query_id="q1", node_id="n7", depth=1):
            row["one_sink_typed_ns"] = round(_best(typed, number, repeat))
            kept.clear()
        token = _old_sinks.set((kept.append,))
        try:
            row["one_sink_untyped_ns"] = round(_best(old, number, repeat))
        finally:
            _old_sinks.reset(token)
            kept.clear()
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rows = measure(args.number, args.repeat)
    RESULTS.write_text(
        json.dumps(
            {**provenance("events.py"), "unit": "ns per emit, best of repeats", "rows": rows}, indent=2
        )
        + "\n",
        encoding="utf-8",
    )
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
