"""`rlm-async serve` with the OpenTelemetry SDK's in-memory exporter installed as the
process's global tracer provider, as an operator's own exporter would be: the server's
`--otel` spans go to it, and when the server exits (SIGTERM, after draining) every finished
span is written as one JSON line to the file named by `RLM_TEST_SPANS`.

    python tests/_otel_serve.py serve --otel --config serve.toml --port 0
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rlm_async.cli import main


def _record(span: Any) -> dict[str, Any]:
    return {
        "name": span.name,
        "trace_id": format(span.context.trace_id, "032x"),
        "span_id": format(span.context.span_id, "016x"),
        "parent_id": format(span.parent.span_id, "016x") if span.parent is not None else None,
        "kind": span.kind.name,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
    }


def _dump(exporter: InMemorySpanExporter, path: str) -> None:
    with open(path, "w") as out:
        for span in exporter.get_finished_spans():
            out.write(json.dumps(_record(span)) + "\n")


if __name__ == "__main__":
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    atexit.register(_dump, exporter, os.environ["RLM_TEST_SPANS"])
    sys.exit(main(sys.argv[1:]))
