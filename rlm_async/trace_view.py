"""A trace as one self-contained HTML page: a Gantt chart of every call, and the figures.

    html = render_html("traces/q-123.jsonl")        # or a list of events, or a Trace
    main_view("traces/q-123.jsonl", "run.html")     # what `rlm-async trace view` runs

The page needs nothing but a browser: the CSS, the script and the data are inline, there is
no CDN and no build step, and its Content-Security-Policy forbids every fetch. The chart
draws each call as a bar, by depth and start time, packed into lanes (so thousands of
calls stay a screen tall), coloured by model, status or call kind; REPL cells are the grey
bars above each depth; the critical path is outlined; hovering a bar shows its tokens,
cost, error and, if the trace holds it, its output text (cut to `max_text_chars`). The
summary and the tables above and below are plain HTML and read without JavaScript.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Iterable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from ._events import Event
from ._trace import Trace, load_trace
from ._trace_summary import CallSpan, TraceSummary, summarize
from ._types import Usage

__all__ = ["main_view", "render_html"]

_PLACEHOLDER = re.compile(r"__(CSS|JS|TITLE|SUBTITLE|CARDS|TABLES|DATA)__")

TraceSource = str | os.PathLike[str] | Trace | TraceSummary | Iterable[Event]


@cache
def _asset(name: str) -> str:
    return resources.files("rlm_async._trace_view").joinpath(name).read_text(encoding="utf-8")


def _finite(x: float, digits: int) -> float | None:
    return round(x, digits) if math.isfinite(x) else None


def _call_row(
    c: CallSpan, models: dict[str, int], statuses: dict[str, int], crit: set[str], max_text: int
) -> list[Any]:
    # Rows, not objects: a third of the bytes at thousands of calls. Column order is
    # mirrored by the constants at the top of view.js.
    text = c.text[:max_text] + ("…" if len(c.text) > max_text else "") if c.text and max_text else None
    return [
        _finite(c.start, 6),
        _finite(c.end, 6),
        c.depth,
        models.setdefault(c.model, len(models)),
        statuses.setdefault(c.status, len(statuses)),
        c.call_kind,
        c.call_id,
        c.node_id,
        c.prompt_tokens,
        c.cached_tokens,
        c.completion_tokens,
        _finite(c.cost_usd, 9),
        c.attempts,
        c.error,
        int(c.call_id in crit),
        text,
        [_finite(t, 6) for t in c.hedges],
        int(c.hedge_won),
    ]


def _downsample(points: tuple[tuple[float, int], ...], limit: int = 4000) -> list[list[float]]:
    # Keeps each bucket's highest point, so the peak survives the thinning.
    if len(points) <= limit:
        return [[round(t, 6), n] for t, n in points]
    size = math.ceil(len(points) / limit)
    out = []
    for i in range(0, len(points), size):
        bucket = points[i : i + size]
        t, n = max(bucket, key=lambda p: p[1])
        out.append([round(t, 6), n])
    return out


def _data(s: TraceSummary, max_text: int) -> dict[str, Any]:
    crit_calls = set(s.critical_calls)
    crit_cells = {step.id for step in s.critical_path if step.kind == "cell"}
    models: dict[str, int] = {}
    statuses: dict[str, int] = {}
    calls = [_call_row(c, models, statuses, crit_calls, max_text) for c in s.calls]
    node_depth = {n.node_id: n.depth for n in s.nodes.values()}
    cells = [
        [
            _finite(k.start, 6),
            _finite(k.end, 6),
            node_depth.get(k.node_id or "", 0),
            _label(s, k.node_id),
            k.iteration,
            k.cell,
            k.status,
            int(f"{k.node_id}/{k.iteration}.{k.cell}" in crit_cells),
        ]
        for k in s.cells
    ]
    return {
        "wall_s": _finite(s.wall_s, 6) or 0.0,
        "peak_in_flight": s.peak_in_flight,
        "models": list(models),
        "statuses": list(statuses),
        "calls": calls,
        "cells": cells,
        "concurrency": _downsample(s.concurrency),
    }


def _label(s: TraceSummary, node_id: str | None) -> str:
    node = s.nodes.get(node_id or "")
    if node is None:
        return str(node_id)
    return node.node_id if node.label in (None, node.node_id) else f"{node.node_id} ({node.label})"


def _usd(x: float) -> str:
    return f"${x:,.2f}" if x >= 10 else f"${x:.4f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def _seconds(x: float) -> str:
    return f"{x:.2f} s" if x < 100 else f"{x:.0f} s"


def _card(key: str, value: str, note: str = "") -> str:
    e = html.escape
    return (
        f'<div class="card"><div class="k">{e(key)}</div><div class="v">{e(value)}</div>'
        f'<div class="n">{e(note)}</div></div>'
    )


def _cards(s: TraceSummary) -> str:
    t = s.totals
    budget = f"of {_usd(s.budget_usd)} budget" if s.budget_usd else "no budget cap"
    crit_share = s.critical_path_s / s.wall_s if s.wall_s > 0 else 0.0
    return "\n".join(
        [
            _card("wall time", _seconds(s.wall_s), s.status),
            _card(
                "measured critical path",
                _seconds(s.critical_path_s),
                f"model time on this run's longest chain, {crit_share:.0%} of wall; "
                f"{len(s.critical_calls)} calls",
            ),
            _card("calls", str(t.calls), f"{t.failed_calls} failed, {s.retries} retries"),
            _card("peak in flight", str(s.peak_in_flight), f"{len(s.nodes)} nodes"),
            _card("tokens in", f"{t.prompt_tokens:,}", f"{_pct(t.cache_hit_ratio)} cached"),
            _card("tokens out", f"{t.completion_tokens:,}"),
            _card("cost", _usd(t.cost_usd), budget),
        ]
    )


def _totals_table(title: str, head: str, rows: Iterable[tuple[str, Usage, str]], extra: str) -> str:
    e = html.escape
    body = "".join(
        f"<tr><td>{e(key)}</td><td>{t.calls}</td><td>{t.failed_calls}</td><td>{t.prompt_tokens:,}</td>"
        f"<td>{t.cached_tokens:,}</td><td>{_pct(t.cache_hit_ratio)}</td><td>{t.completion_tokens:,}</td>"
        f"<td>{_usd(t.cost_usd)}</td>" + (f"<td>{e(more)}</td>" if extra else "") + "</tr>"
        for key, t, more in rows
    )
    extra_head = f"<th>{e(extra)}</th>" if extra else ""
    return (
        f"<div><h2>{e(title)}</h2><table><tr><th>{e(head)}</th><th>calls</th><th>failed</th>"
        f"<th>prompt</th><th>cached</th><th>cache hit</th><th>completion</th><th>cost</th>"
        f"{extra_head}</tr>{body}</table></div>"
    )


def _path_table(s: TraceSummary) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{'&nbsp;' * 2 * step.depth}{e(step.kind)} {e(step.id)}</td><td>{step.depth}</td>"
        f"<td>{e(step.model or '')}</td><td>{step.start:.3f}</td><td>{step.duration:.3f}</td></tr>"
        for step in s.critical_path
    )
    return (
        f"<details><summary>critical path: {len(s.critical_path)} steps</summary><table>"
        f"<tr><th>step</th><th>depth</th><th>model</th><th>start (s)</th><th>duration (s)</th></tr>"
        f"{rows}</table></details>"
    )


def _tables(s: TraceSummary) -> str:
    by_depth = [(str(d), t, str(s.peak_in_flight_by_depth.get(d, 0))) for d, t in sorted(s.by_depth.items())]
    by_model = [(m, t, "") for m, t in sorted(s.by_model.items())]
    return "\n".join(
        [
            _totals_table("by depth", "depth", by_depth, "peak in flight"),
            _totals_table("by model", "model", by_model, ""),
            f"<div>{_path_table(s)}</div>",
        ]
    )


def _script_json(value: Any) -> str:
    # Inside <script>, "</script>" or "<!--" in a string would end the block early.
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _summary_of(source: TraceSource) -> TraceSummary:
    if isinstance(source, TraceSummary):
        return source
    if isinstance(source, Trace):
        return source.summarize()
    if isinstance(source, str | os.PathLike):
        return load_trace(source).summarize()
    return summarize(source)


def render_html(source: TraceSource, *, title: str | None = None, max_text_chars: int = 1000) -> str:
    """The HTML page for a trace file path, a loaded `Trace`, a summary, or events."""
    s = _summary_of(source)
    title = title or f"rlm_async trace {s.query_id or ''}".strip()
    depth = max((n.depth for n in s.nodes.values()), default=0)
    subtitle = (
        f"query {s.query_id or '?'} · {s.status} · {len(s.calls)} calls in {len(s.nodes)} nodes, "
        f"depth ≤ {depth} · times in seconds from query start"
    )
    values = {
        "CSS": _asset("view.css"),
        "JS": _asset("view.js"),
        "TITLE": html.escape(title),
        "SUBTITLE": html.escape(subtitle),
        "CARDS": _cards(s),
        "TABLES": _tables(s),
        "DATA": _script_json(_data(s, max_text_chars)),
    }
    # One pass over the template: text from the trace is never scanned for placeholders.
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], _asset("template.html"))


def main_view(
    trace_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the HTML page of `trace_path` to `out_path` (default: beside it, `.html`)."""
    trace_path = Path(trace_path)
    out = Path(out_path) if out_path is not None else trace_path.with_suffix(".html")
    out.write_text(render_html(trace_path), encoding="utf-8")
    return out
