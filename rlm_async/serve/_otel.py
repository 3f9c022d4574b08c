"""OpenTelemetry spans from the engine's events, following the GenAI semantic conventions
(an optional extra: `pip install 'rlm-async[otel]'`).

    query (and every child RLM)   invoke_agent rlm      gen_ai.operation.name = invoke_agent
    each model call               chat <model>          gen_ai.operation.name = chat, usage
    each REPL cell                execute_tool repl     gen_ai.operation.name = execute_tool

A child RLM's span nests under the cell that started it, and a sub-call's `chat` span under
the cell whose code asked for it, so the span tree is the query's task tree. Spans are
started and ended as the events arrive (the sink is synchronous and never blocks); the
exporter is whatever the tracer provider was given (the SDK's batch processor in a server).
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from .. import _events
from ._adapter import event_fields

__all__ = ["SpanSink"]

_AGENT = "rlm"


class SpanSink:
    """An event sink that turns one or more queries' events into spans."""

    def __init__(
        self, tracer_provider: trace.TracerProvider | None = None, *, provider_name: str = "openai"
    ) -> None:
        self._tracer = trace.get_tracer("rlm_async", tracer_provider=tracer_provider)
        self._provider_name = provider_name
        self._nodes: dict[tuple[str | None, str], Span] = {}
        """(query_id, rlm node id) -> its invoke_agent span."""
        self._calls: dict[tuple[str | None, str], Span] = {}
        """(query_id, call id) -> its chat span."""
        self._cells: dict[tuple[str | None, str], Span] = {}
        """(query_id, rlm node id) -> the execute_tool span of the cell running in it now."""

    def _parent_of(self, query: str | None, node_id: str | None) -> Span | None:
        if node_id is None:
            return None
        key = (query, node_id)
        return self._cells.get(key) or self._nodes.get(key)

    def _start(self, name: str, parent: Span | None, kind: SpanKind, attributes: dict[str, Any]) -> Span:
        context = trace.set_span_in_context(parent) if parent is not None else None
        return self._tracer.start_span(name, context=context, kind=kind, attributes=attributes)

    def __call__(self, event: _events.Event) -> None:
        kind = event.kind
        q = event.query_id
        f = event_fields(event)
        if kind == "node.start" and f.get("node_kind") == "rlm" and event.node_id is not None:
            parent = self._parent_of(q, f.get("parent_id"))
            self._nodes[(q, event.node_id)] = self._start(
                f"invoke_agent {_AGENT}",
                parent,
                SpanKind.INTERNAL,
                {
                    "gen_ai.operation.name": "invoke_agent",
                    "gen_ai.agent.name": _AGENT,
                    "gen_ai.request.model": str(f.get("model")),
                    "rlm.depth": event.depth or 0,
                    "rlm.query_id": q or "",
                },
            )
        elif kind == "node.finish" and event.node_id is not None:
            span = self._nodes.pop((q, event.node_id), None)
            if span is not None:
                status = f.get("status")
                if status not in ("ok", None):
                    span.set_status(Status(StatusCode.ERROR, str(f.get("error") or status)))
                    span.set_attribute("error.type", str(status))
                span.end()
        elif kind == "call.start":
            parent = self._parent_of(q, f.get("parent_id"))
            model = str(f.get("model"))
            self._calls[(q, str(f.get("call_id")))] = self._start(
                f"chat {model}",
                parent,
                SpanKind.CLIENT,
                {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.provider.name": self._provider_name,
                    "gen_ai.request.model": model,
                    "rlm.call_kind": str(f.get("call_kind")),
                },
            )
        elif kind == "call.finish":
            span = self._calls.pop((q, str(f.get("call_id"))), None)
            if span is not None:
                span.set_attribute("gen_ai.usage.input_tokens", int(f.get("prompt_tokens") or 0))
                span.set_attribute("gen_ai.usage.output_tokens", int(f.get("completion_tokens") or 0))
                span.set_attribute("rlm.cached_tokens", int(f.get("cached_tokens") or 0))
                span.set_attribute("rlm.cost_usd", float(f.get("cost_usd") or 0.0))
                if f.get("status") != "ok":
                    span.set_status(Status(StatusCode.ERROR, str(f.get("error") or f.get("status"))))
                    span.set_attribute("error.type", str(f.get("status")))
                span.end()
        elif kind == "cell.start" and event.node_id is not None:
            parent = self._nodes.get((q, event.node_id))
            self._cells[(q, event.node_id)] = self._start(
                "execute_tool repl",
                parent,
                SpanKind.INTERNAL,
                {
                    "gen_ai.operation.name": "execute_tool",
                    "gen_ai.tool.name": "repl",
                    "gen_ai.tool.type": "function",
                    "rlm.iteration": int(f.get("iteration") or 0),
                    "rlm.cell": int(f.get("cell") or 0),
                },
            )
        elif kind == "cell.finish" and event.node_id is not None:
            span = self._cells.pop((q, event.node_id), None)
            if span is not None:
                if f.get("status") not in ("ok", None):
                    span.set_status(Status(StatusCode.ERROR, str(f.get("error") or f.get("status"))))
                    span.set_attribute("error.type", str(f.get("status")))
                span.end()
