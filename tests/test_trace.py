from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import structlog
from _events_factory import (
    CRITICAL_CALLS,
    T0,
    RunBuilder,
    call_finish,
    node_finish,
    node_start,
    query_finish,
    query_start,
    standard_run,
)

from rlm_async._events import (
    EVENT_TYPES,
    CallFinish,
    CallRetry,
    Event,
    IterationStart,
    WorkerStart,
    bind,
    current_ids,
    emit,
    payload_fields,
    sinks,
)
from rlm_async._rlm import RLM
from rlm_async._trace import (
    FORMAT,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    TraceWriter,
    event_to_json,
    load_trace,
    summarize,
    write_trace,
)
from rlm_async._types import ModelRequest
from rlm_async.exceptions import ConfigError
from rlm_async.testing import ScriptedTransport, capture_events
from rlm_async.trace_view import render_html


def _scripted_rlm(**kwargs: Any) -> RLM:
    """A depth-2 RLM whose replies come from `TestWithTheEngine._reply`: one child, two leaves."""
    return RLM(
        backend="openai",
        backend_kwargs={"model_name": "gpt-5-mini", "api_key": "unused"},
        max_depth=2,
        transport=ScriptedTransport(TestWithTheEngine._reply),
        **kwargs,
    )


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


class TestTraceWriter:
    def test_entering_makes_the_directory_and_refuses_one_it_cannot_use(self, tmp_path: Path) -> None:
        """Checked on entering, before any query runs: a path that is a file, or under one,
        is a ConfigError naming it (it was an error logged per query, the run going on)."""
        deep = tmp_path / "a" / "b"
        with TraceWriter(deep):
            assert deep.is_dir()
        a_file = tmp_path / "notes.txt"
        a_file.write_text("x")
        with pytest.raises(ConfigError, match=r"cannot write traces to .*notes\.txt: it is a file"):
            TraceWriter(a_file).__enter__()
        with pytest.raises(ConfigError, match=r"cannot write traces to .*notes\.txt/sub: Not a directory"):
            TraceWriter(a_file / "sub").__enter__()

    def test_writes_one_file_per_query_with_a_header(self, tmp_path: Path) -> None:
        """Each query's events go to <dir>/<query_id>.jsonl, after one header line."""
        a = standard_run().events()
        b = [query_start(T0, "q-other"), query_finish(T0 + 1.0, "q-other")]
        with TraceWriter(tmp_path) as writer:
            for event in sorted(a + b, key=lambda e: e.time):
                writer(event)
        assert set(writer.paths) == {"q-test", "q-other"}
        lines = _lines(writer.paths["q-test"])
        assert lines[0]["format"] == FORMAT and lines[0]["version"] == FORMAT_VERSION
        assert lines[0]["query_id"] == "q-test" and lines[0]["clock_origin"] == T0
        assert len(lines) == len(a) + 1
        assert [line["kind"] for line in lines[1:]] == [e.kind for e in a]
        assert len(_lines(writer.paths["q-other"])) == 3

    @pytest.mark.asyncio
    async def test_a_real_querys_events_load_back_equal(self, tmp_path: Path) -> None:
        """Every event a real depth-2 query emits is written and read back equal: same class,
        envelope and fields."""
        with capture_events() as events:
            async with _scripted_rlm() as rlm:
                await rlm.acompletion("ctx " * 50, root_prompt="what?")
        assert {"query.start", "call.start", "call.finish", "worker.start", "query.finish"} <= set(
            events.kinds()
        )
        assert load_trace(write_trace(events, tmp_path / "t.jsonl")).events == events

    def test_emitted_events_are_written_under_a_safe_name(self, tmp_path: Path) -> None:
        """Events emitted under `sinks(writer)` get the bound ids and the sinks' clock; the file
        name is the query id made safe; a value that is not JSON is kept as its text."""
        writer = TraceWriter(tmp_path)
        ticks = iter(range(100))
        with writer, sinks(writer, clock=lambda: float(next(ticks))):
            with bind(query_id="q 1/x", node_id="root", depth=0):
                emit(IterationStart, iteration=1)
                emit(
                    CallRetry,
                    call_id="c1",
                    attempt=1,
                    error=ValueError("boom"),  # type: ignore[arg-type]  # what a buggy producer might pass
                    wait_s=0.5,
                    model="m",
                    endpoint="e",
                )
                writer(query_finish(9.0, "q 1/x"))
        path = writer.paths["q 1/x"]
        assert path.name == "q_1_x.jsonl"
        events = load_trace(path).events
        assert [e.kind for e in events] == ["iteration.start", "call.retry", "query.finish"]
        assert [(e.time, e.query_id, e.node_id, e.depth) for e in events[:2]] == [
            (0.0, "q 1/x", "root", 0),
            (1.0, "q 1/x", "root", 0),
        ]
        assert isinstance(events[1], CallRetry) and events[1].error == "boom"

    def test_redact_drops_the_text_field(self, tmp_path: Path) -> None:
        """`redact=("text",)` keeps model output out of the file."""
        with TraceWriter(tmp_path, redact=("text",)) as writer:
            for event in standard_run().events():
                writer(event)
        body = writer.paths["q-test"].read_text(encoding="utf-8")
        assert "FINAL(42)" not in body
        assert _lines(writer.paths["q-test"])[0]["redacted"] == ["text"]

    def test_events_outside_a_query_are_counted_not_written(self, tmp_path: Path) -> None:
        """An event with no query_id has no file; it is counted in `unbound_events`."""
        with TraceWriter(tmp_path) as writer:
            writer(WorkerStart(time=1.0, pid=1, isolated=False, uid=None, context_bytes=0, duration_s=0.0))
        assert writer.unbound_events == 1
        assert list(tmp_path.iterdir()) == []

    def test_query_finish_closes_the_file_and_late_events_are_appended(self, tmp_path: Path) -> None:
        """The file is complete at query.finish; a straggler is appended without a second header."""
        writer = TraceWriter(tmp_path)
        writer(query_start(1.0))
        writer(query_finish(2.0))
        assert len(_lines(writer.paths["q"])) == 3  # readable before close(): it was closed
        writer(node_finish(3.0, "q", "n"))
        writer.close()
        assert [line.get("kind") for line in _lines(writer.paths["q"])] == [
            None,
            "query.start",
            "query.finish",
            "node.finish",
        ]

    def test_never_overwrites_a_trace(self, tmp_path: Path) -> None:
        """A reused query id, in this writer or an earlier one, gets the next free file name."""
        (tmp_path / "q1.jsonl").write_text("an older run\n")
        writer = TraceWriter(tmp_path)
        for round_ in range(2):
            writer(query_start(1.0 + round_, "q1"))
            writer(query_finish(2.0 + round_, "q1"))
        assert writer.paths["q1"] == tmp_path / "q1-3.jsonl"
        assert (tmp_path / "q1.jsonl").read_text() == "an older run\n"
        assert [e.time for e in load_trace(tmp_path / "q1-2.jsonl").events] == [1.0, 2.0]
        assert [e.time for e in load_trace(tmp_path / "q1-3.jsonl").events] == [2.0, 3.0]

    def test_makes_its_directory_when_it_is_missing(self, tmp_path: Path) -> None:
        """The directory is made at the first query, and again if it was removed since."""
        directory = tmp_path / "traces" / "today"
        writer = TraceWriter(directory)
        writer(query_start(1.0, "q1"))
        writer(query_finish(2.0, "q1"))
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()
        writer(query_start(3.0, "q2"))
        writer(query_finish(4.0, "q2"))
        writer.close()
        assert writer.paths["q2"] == directory / "q2.jsonl"
        assert [e.time for e in load_trace(directory / "q2.jsonl").events] == [3.0, 4.0]

    def test_flushes_once_the_interval_has_passed(self, tmp_path: Path) -> None:
        """Buffered lines reach the disk once `flush_interval_s` has passed on the writer's clock."""
        now = [0.0]
        writer = TraceWriter(tmp_path, flush_interval_s=1.0, clock=lambda: now[0])
        writer(query_start(1.0))
        assert writer.paths["q"].read_text(encoding="utf-8") == ""
        now[0] = 1.5
        writer(node_start(1.1))
        assert len(_lines(writer.paths["q"])) == 3
        writer.close()

    def test_a_write_failure_stops_that_trace_without_raising(self, tmp_path: Path) -> None:
        """When the file cannot be written, the sink gives up on that query and does not raise."""
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("x")
        writer = TraceWriter(blocker)
        writer(query_start(1.0))
        writer(query_finish(2.0))
        assert writer.paths == {}

    def test_writes_in_batches_of_max_buffered(self, tmp_path: Path) -> None:
        """With the clock standing still, buffered events reach the file once `max_buffered` are waiting."""
        writer = TraceWriter(tmp_path, max_buffered=3, clock=lambda: 0.0)
        writer(query_start(1.0))
        writer(node_start(1.1))
        assert writer.paths["q"].read_text(encoding="utf-8") == ""
        writer(node_finish(1.2))
        assert [line.get("kind") for line in _lines(writer.paths["q"])] == [
            None,
            "query.start",
            "node.start",
            "node.finish",
        ]
        writer.close()

    def test_an_unclosed_writer_writes_its_buffer_when_collected(self, tmp_path: Path) -> None:
        """A writer dropped without close() still writes what it buffered, as a file object would."""
        writer = TraceWriter(tmp_path)
        writer(query_start(1.0))
        writer(node_start(1.1))
        path = writer.paths["q"]
        del writer
        gc.collect()
        assert [e.kind for e in load_trace(path).events] == ["query.start", "node.start"]

    def test_an_unclosed_writer_writes_its_buffer_at_exit(self, tmp_path: Path) -> None:
        """A process that ends normally without close() leaves every event it buffered on disk."""
        script = (
            "import sys\n"
            "from rlm_async._events import NodeStart, QueryStart\n"
            "from rlm_async._trace import TraceWriter\n"
            "writer = TraceWriter(sys.argv[1])\n"
            "writer(QueryStart(time=1.0, query_id='q', context_type='str', context_chars=0,\n"
            "                  root_prompt_chars=0, max_depth=1, budget_usd=None))\n"
            "writer(NodeStart(time=1.1, query_id='q', node_id='root', depth=0, parent_id=None,\n"
            "                 node_kind='rlm', model='m', label='root'))\n"
        )
        subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=60)
        assert [e.kind for e in load_trace(tmp_path / "q.jsonl").events] == ["query.start", "node.start"]

    def test_an_event_that_cannot_be_written_is_left_out_and_logged(self, tmp_path: Path) -> None:
        """A field that fails even as text costs its own event, logged; the events around it are kept."""

        class Unprintable:
            def __str__(self) -> str:
                raise RuntimeError("no text")

        with structlog.testing.capture_logs() as logs, TraceWriter(tmp_path) as writer:
            writer(query_start(1.0))
            writer(call_finish(1.1, "c1", error=Unprintable()))
            writer(query_finish(1.2))
        assert [e.kind for e in load_trace(writer.paths["q"]).events] == ["query.start", "query.finish"]
        assert [(log["event"], log["event_kind"]) for log in logs] == [
            ("trace: an event could not be serialised; left out", "call.finish")
        ]

    @pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
    def test_a_full_disk_at_a_flush_stops_that_query_only(self, tmp_path: Path) -> None:
        """A write that fails when the buffer is flushed ends that query's trace, logged once; others go on."""
        writer = TraceWriter(tmp_path)
        writer(query_start(1.0, "full"))
        writer(query_finish(1.1, "full"))
        # Its straggler reopens the file for appending: make that file a full disk.
        writer.paths["full"].unlink()
        writer.paths["full"].symlink_to("/dev/full")
        writer(query_start(2.0, "ok"))
        with structlog.testing.capture_logs() as logs:
            writer(node_finish(2.1, "full", "n"))
            writer.flush()
            writer(node_finish(2.2, "full", "n"))
            writer.flush()
        writer(query_finish(2.3, "ok"))
        assert [log["event"] for log in logs] == ["trace write failed; tracing stopped for this query"]
        assert [e.kind for e in load_trace(writer.paths["ok"]).events] == ["query.start", "query.finish"]

    def test_the_documented_line_byte_for_byte(self) -> None:
        """The call.finish example of docs/trace-format.md is what the writer produces, to the byte."""
        doc = (Path(__file__).parents[1] / "docs" / "trace-format.md").read_text(encoding="utf-8")
        line = next(ln for ln in doc.splitlines() if ln.startswith('{"kind":"call.finish"'))
        fields = json.loads(line)["fields"]
        event = CallFinish(time=8813.941, query_id="q1", node_id="n7", depth=1, **fields)
        assert event_to_json(event) == line
        assert event_to_json(call_finish(1.0, "c1", text="déjà vu")).endswith('"text":"déjà vu"}}')


class TestEmit:
    def test_bind_overrides_only_the_ids_it_names(self) -> None:
        """A nested `bind` replaces the ids it is given, keeps the others, and restores all on exit."""
        assert current_ids() == (None, None, None)
        with bind(query_id="q", node_id="root", depth=0):
            with bind(node_id="child"):
                assert current_ids() == ("q", "child", 0)
                with bind(depth=1):
                    assert current_ids() == ("q", "child", 1)
            assert current_ids() == ("q", "root", 0)
        assert current_ids() == (None, None, None)

    def test_a_failing_sink_is_logged_and_the_others_still_get_the_event(self) -> None:
        """An exception in one sink is logged and swallowed; the sinks after it see the event."""
        seen: list[Event] = []

        def broken(event: Event) -> None:
            raise RuntimeError("observer bug")

        with structlog.testing.capture_logs() as logs, sinks(broken, seen.append, clock=lambda: 5.0):
            with bind(query_id="q", node_id="n", depth=2):
                returned = emit(IterationStart, iteration=1)
        assert seen == [IterationStart(time=5.0, query_id="q", node_id="n", depth=2, iteration=1)]
        assert returned is seen[0]
        assert [(log["event"], log["event_kind"]) for log in logs] == [
            ("event sink failed", "iteration.start")
        ]

    def test_nobody_listening_builds_no_event(self) -> None:
        """Without sinks, emit returns None and builds nothing (not even a wrong event)."""
        assert emit(IterationStart, iteration=1) is None
        assert emit(IterationStart) is None  # type: ignore[call-arg]  # never built: nobody listens

    def test_emit_builds_what_the_class_builds(self) -> None:
        """For every kind, the event `emit` builds (through its fast constructor) equals the
        one the class's own constructor builds, defaults included; a missing or unknown
        field is a TypeError either way."""
        samples: dict[object, object] = {int: 3, float: 2.5, str: "x", bool: True}
        for cls in EVENT_TYPES.values():
            hints = typing.get_type_hints(cls)
            required = {
                f.name: samples[
                    typing.get_args(hints[f.name])[0] if typing.get_args(hints[f.name]) else hints[f.name]
                ]
                for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.name in payload_fields(cls)
            }
            with capture_events() as events, bind(query_id="q", node_id="n", depth=2):
                emit(cls, **required)
            assert events == [cls(time=events[0].time, query_id="q", node_id="n", depth=2, **required)]
            assert type(events[0]) is cls
            with capture_events(), pytest.raises(TypeError):
                emit(cls, **required, no_such_field=1)
            if required:
                with capture_events(), pytest.raises(TypeError):
                    emit(cls)

    def test_the_registry_holds_every_kind_once(self) -> None:
        """Every event class is registered under its own dotted kind, with its payload apart
        from the envelope."""
        assert all(cls.kind == kind and "." in kind for kind, cls in EVENT_TYPES.items())
        assert payload_fields(CallRetry)[0] == "call_id"
        assert not {"time", "query_id", "node_id", "depth"} & {
            f for c in EVENT_TYPES.values() for f in payload_fields(c)
        }


class TestLoadTrace:
    def test_rejects_a_file_without_a_header(self, tmp_path: Path) -> None:
        """A file whose first line is not a trace header is refused with ValueError."""
        path = tmp_path / "x.jsonl"
        path.write_text('{"kind": "call.start", "time": 1}\n')
        with pytest.raises(ValueError, match="not an rlm_async trace"):
            load_trace(path)

    def test_rejects_a_newer_format_version(self, tmp_path: Path) -> None:
        """A trace from a newer format version is refused, naming both versions."""
        path = tmp_path / "x.jsonl"
        path.write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION + 1}) + "\n")
        with pytest.raises(ValueError, match=f"version {FORMAT_VERSION + 1}.*up to version {FORMAT_VERSION}"):
            load_trace(path)

    def test_rejects_a_version_it_never_wrote(self, tmp_path: Path) -> None:
        """Version 0 (never written) is refused, naming the versions this reader reads."""
        path = tmp_path / "x.jsonl"
        path.write_text(json.dumps({"format": FORMAT, "version": 0}) + "\n")
        with pytest.raises(ValueError, match=r"version 0; this rlm_async reads versions 1, 2") as caught:
            load_trace(path)
        assert "upgrade" not in str(caught.value)
        assert READABLE_VERSIONS == (1, FORMAT_VERSION)

    def test_reads_version_1_naming_the_call_of_each_retry(self, tmp_path: Path) -> None:
        """A version-1 trace (its call.retry without a call_id, as the engine wrote them) loads
        with each retry given the call whose call.start named the same node, so retries count."""
        call = {"call_id": "c1", "parent_id": "n1", "call_kind": "sub", "model": "m", "prompt_chars": 4}
        retry = {"attempt": 1, "error": "ServerError: 500", "wait_s": 0.1, "model": "m", "endpoint": "e"}
        finish = {
            "call_id": "c1",
            "status": "ok",
            "prompt_tokens": 1,
            "cached_tokens": 0,
            "completion_tokens": 1,
            "cost_usd": 0.0,
            "latency_s": 0.3,
            "attempts": 2,
            "from_journal": False,
            "error": None,
        }
        lines = [
            {"format": FORMAT, "version": 1, "query_id": "q"},
            {"kind": "call.start", "time": 1.0, "query_id": "q", "node_id": "n2", "depth": 1, "fields": call},
            {
                "kind": "call.retry",
                "time": 1.1,
                "query_id": "q",
                "node_id": "n2",
                "depth": 1,
                "fields": retry,
            },
            {
                "kind": "call.finish",
                "time": 1.3,
                "query_id": "q",
                "node_id": "n2",
                "depth": 1,
                "fields": finish,
            },
        ]
        path = tmp_path / "v1.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        trace = load_trace(path)
        assert (trace.version, trace.bad_lines) == (1, 0)
        (retried,) = [e for e in trace.events if isinstance(e, CallRetry)]
        assert retried.call_id == "c1"
        assert trace.summarize().retries == 1

    def test_a_field_of_the_wrong_type_makes_a_bad_line_and_unknown_kinds_are_counted(
        self, tmp_path: Path
    ) -> None:
        """The reader checks every field against its class: a wrong type or a missing field is
        a bad line; a kind it does not know (from a newer writer) is left out and counted."""
        events = standard_run().events()
        path = write_trace(events, tmp_path / "t.jsonl")
        line = {"kind": "call.finish", "time": T0, "query_id": "q-test", "fields": {"call_id": "x"}}
        typed = dict(json.loads(event_to_json(events[-1])), fields={"status": 7, "wall_s": 1.0})
        newer = {"kind": "call.teleport", "time": T0, "query_id": "q-test", "fields": {}}
        with path.open("a", encoding="utf-8") as handle:
            for extra in (line, typed, newer):
                handle.write(json.dumps(extra) + "\n")
        trace = load_trace(path)
        assert (trace.bad_lines, trace.unknown_events) == (2, 1)
        assert trace.events == events

    def test_skips_a_line_cut_short(self, tmp_path: Path) -> None:
        """A half-written last line (a killed process) is skipped and counted."""
        events = standard_run().events()
        path = write_trace(events, tmp_path / "t.jsonl")
        with path.open("a", encoding="utf-8") as handle:
            handle.write('{"kind": "call.fin')
        trace = load_trace(path)
        assert trace.bad_lines == 1
        assert trace.events == events


@pytest.fixture(params=[True, False], ids=["engine-style", "explicit-style"])
def engine_style(request: pytest.FixtureRequest) -> bool:
    """Both ways of naming nodes in events (see _events_factory)."""
    return bool(request.param)


class TestSummarize:
    def test_rebuilds_the_tree_with_parent_links_and_depths(self) -> None:
        """Every node is found with its parent, depth, kind and children; each call hangs on its own node."""
        s = summarize(standard_run().events())
        assert len(s.nodes) == 115 and s.roots == ("root",)
        root = s.nodes["root"]
        assert (root.parent_id, root.depth, root.node_kind, root.iterations) == (None, 0, "rlm", 3)
        assert len(root.children) == 107 and root.calls == ()
        assert (s.nodes["r1.n"].parent_id, s.nodes["r1.n"].depth, s.nodes["r1.n"].calls) == (
            "root",
            0,
            ("r1",),
        )
        assert s.nodes["s42"].parent_id == "root" and s.nodes["s42"].depth == 1
        k1 = s.nodes["k1"]
        assert (k1.node_kind, k1.depth, k1.iterations) == ("rlm", 1, 2)
        assert k1.children == ("k1r1.n", *(f"k1n{j}" for j in range(5)), "k1r2.n")
        assert all(s.nodes[f"k1n{j}"].depth == 2 for j in range(5))
        assert s.nodes["s7"].status == "error" and s.nodes["s7"].error == "RateLimited: 429"

    def test_root_calls_made_on_the_rlm_node_hang_on_it(self) -> None:
        """When an RLM makes its own calls on its node (no "llm" node of their own), they are its calls."""
        s = summarize(standard_run(engine_style=False).events())
        assert len(s.nodes) == 110
        root = s.nodes["root"]
        assert len(root.children) == 104 and root.calls == ("r1", "r2", "r3")
        assert s.nodes["k1"].children == tuple(f"k1n{j}" for j in range(5))
        assert s.nodes["k1n3"].parent_id == "k1" and s.nodes["k1n3"].depth == 2

    def test_totals_per_model_and_depth_match_the_calls(self, engine_style: bool) -> None:
        """Calls, tokens and dollars add up overall, per model and per depth."""
        run = standard_run(engine_style=engine_style)
        s = summarize(run.events())
        assert s.totals.calls == len(run.calls) == 113
        assert s.totals.failed_calls == 1 and s.retries == 2
        for key, group in (("model", s.by_model), ("depth", s.by_depth)):
            for value, totals in group.items():
                mine = [c for c in run.calls if c[key] == value]
                assert totals.calls == len(mine)
                assert totals.prompt_tokens == sum(c["prompt"] for c in mine)
                assert totals.cached_tokens == sum(c["cached"] for c in mine)
                assert totals.completion_tokens == sum(c["completion"] for c in mine)
                assert totals.cost_usd == pytest.approx(sum(c["cost"] for c in mine))
        assert set(s.by_depth) == {0, 1, 2} and set(s.by_model) == {"big", "small"}
        assert s.totals.cost_usd == pytest.approx(s.reported["cost_usd"])
        assert s.totals.prompt_tokens == s.reported["prompt_tokens"]

    def test_cache_hit_ratio_per_depth(self) -> None:
        """The cache-hit ratio of a depth is its cached over its prompt tokens; None without prompts."""
        s = summarize(standard_run().events())
        assert s.by_depth[0].cache_hit_ratio == pytest.approx((0 + 2000 + 2600) / (2000 + 2600 + 3000))
        assert s.by_depth[2].cache_hit_ratio == 0.0
        assert summarize([]).totals.cache_hit_ratio is None

    def test_wall_time_status_budget_and_relative_times(self) -> None:
        """Wall time and status come from query.finish; times count from query.start."""
        s = summarize(standard_run().events())
        assert s.status == "ok" and s.budget_usd == 1.0 and s.query_id == "q-test"
        assert s.wall_s == pytest.approx(s.reported["wall_s"])
        r1 = next(c for c in s.calls if c.call_id == "r1")
        assert r1.start == pytest.approx(0.0102) and r1.end == pytest.approx(1.0102)

    def test_peak_calls_in_flight(self, engine_style: bool) -> None:
        """Concurrency is swept from call starts and finishes, overall and per depth."""
        s = summarize(standard_run(engine_style=engine_style).events())
        assert s.peak_in_flight == 100
        assert s.peak_in_flight_by_depth == {0: 1, 1: 100, 2: 5}
        assert max(n for _, n in s.concurrency) == 100 and s.concurrency[-1][1] == 0

    def test_critical_path_descends_through_the_slowest_children(self, engine_style: bool) -> None:
        """The path runs through root calls and cells, and in each cell the slowest child, recursively."""
        s = summarize(standard_run(engine_style=engine_style).events())
        assert s.critical_calls == CRITICAL_CALLS
        assert s.critical_path_s == pytest.approx(1.0 + 2.5 + 0.8 + 0.5 + 0.6 + 0.3 + 0.6)
        # In engine style each root call also has its node ("r1.n"): leave those out here.
        assert [(step.kind, step.id) for step in s.critical_path if not step.id.endswith(".n")][:5] == [
            ("node", "root"),
            ("call", "r1"),
            ("cell", "root/1.0"),
            ("node", "s42"),
            ("call", "c42"),
        ]
        steps = [step for step in s.critical_path if step.kind == "call"]
        assert all(a.end <= b.start for a, b in itertools.pairwise(steps))
        assert s.critical_path_s <= s.wall_s

    def test_sequential_waves_inside_one_cell_are_chained(self) -> None:
        """Two llm_batch waves in one cell put the slowest call of each wave on the path."""
        b = RunBuilder()
        b.query_start(0.0)
        b.node_start(0.0, "root", None, 0, "rlm", "big")
        for wave, t in ((0, 0.1), (1, 2.1)):
            for i, latency in enumerate((0.5, 1.9, 1.0)):
                b.llm(t, latency, f"w{wave}c{i}", f"w{wave}n{i}", "root", 1, "sub", "small", prompt=10)
        b.cell(0.05, 4.1, "root", 1)
        b.node_finish(4.2, "root")
        assert summarize(b.events()).critical_calls == ("w0c1", "w1c1")

    def test_text_appears_only_where_the_engine_put_it(self) -> None:
        """The optional `text` field of call.finish is carried on that call only."""
        s = summarize(standard_run().events())
        texts = {c.call_id: c.text for c in s.calls if c.text is not None}
        assert texts == {"r3": "FINAL(42)"}

    def test_an_unfinished_run_still_summarizes(self, engine_style: bool) -> None:
        """Without query.finish or the root's node.finish, the run is "unfinished" up to its last event."""
        events = standard_run(engine_style=engine_style, finish=False).events()
        s = summarize(events)
        assert s.status == "unfinished"
        assert s.nodes["root"].status == "unfinished"
        assert s.wall_s == pytest.approx(max(e.time for e in events) - T0)
        assert s.critical_calls == CRITICAL_CALLS[:-1]

    def test_a_call_without_its_start_is_placed_by_its_latency(self) -> None:
        """A call.finish whose call.start is missing gets start = finish - latency_s."""
        events: list[Event] = [query_start(10.0), call_finish(13.0, "c", latency_s=2.0)]
        s = summarize(events)
        (call,) = s.calls
        assert (call.start, call.end, call.node_id) == (1.0, 3.0, "n1")
        assert s.nodes["n1"].status == "unfinished"

    def test_several_queries_need_a_query_id(self) -> None:
        """Events of two queries are refused unless `query_id=` picks one."""
        events = [query_start(1.0, "a"), query_start(1.0, "b")]
        with pytest.raises(ValueError, match="2 queries"):
            summarize(events)
        assert summarize(events, query_id="b").query_id == "b"

    def test_no_events_give_an_empty_summary(self) -> None:
        """An empty event list summarizes to zeros, not an error."""
        s = summarize([])
        assert (s.totals.calls, s.wall_s, s.critical_path, s.status) == (0, 0.0, (), "unfinished")


class TestWithTheEngine:
    """The real engine, scripted transport: the trace must agree with the engine's own result."""

    @staticmethod
    def _reply(request: ModelRequest) -> str:
        first_user = next(m.content for m in request.messages if m.role == "user")
        turns = sum(m.role == "assistant" for m in request.messages)
        if request.messages[-1].content.startswith("leaf"):
            return "leaf answer"
        if "CHILD-CTX" in first_user:  # the child RLM's own loop
            return (
                "```repl\nprint(llm_query_batched(['leaf 1', 'leaf 2']))\n```" if turns == 0 else "FINAL(7)"
            )
        return "```repl\nprint(rlm_query('CHILD-CTX'))\n```" if turns == 0 else "FINAL(42)"

    @pytest.mark.asyncio
    async def test_a_real_query_traces_summarizes_and_renders(self, tmp_path: Path) -> None:
        """A depth-2 query's trace file rebuilds the engine's totals, its tree and a path into the child."""
        subcalls: list[tuple[int, str, str]] = []
        writer = TraceWriter(tmp_path)
        rlm = RLM(
            backend="openai",
            backend_kwargs={"model_name": "gpt-5-mini", "api_key": "unused"},
            max_depth=2,
            transport=ScriptedTransport(self._reply),
            event_sinks=[writer],
            on_subcall_start=lambda *args: subcalls.append(args),
        )
        with writer:
            async with rlm:
                result = await rlm.acompletion("ctx " * 50, root_prompt="what?")
        assert result.status == "ok" and result.response == "42"
        (path,) = writer.paths.values()
        s = load_trace(path).summarize()
        assert s.status == "ok"
        assert s.totals.calls == result.total.calls == len(result.calls) == 6
        assert s.totals.prompt_tokens == result.total.prompt_tokens
        assert s.totals.cost_usd == pytest.approx(result.total.cost_usd)
        rlms = [n for n in s.nodes.values() if n.node_kind == "rlm"]
        assert [(n.depth, n.parent_id) for n in rlms] == [(0, None), (1, s.roots[0])]
        assert subcalls == [(1, "gpt-5-mini", "")]
        by_id = {c.call_id: c for c in s.calls}
        path_calls = [by_id[c] for c in s.critical_calls]
        assert path_calls[0] == s.calls[0] and path_calls[-1] == s.calls[-1]
        assert [c.depth for c in path_calls] == [0, 1, 2, 1, 0]
        page = render_html(path)
        data = re.search(r'id="trace-data">(.*?)</script>', page, re.S)
        assert data is not None and len(json.loads(data.group(1))["calls"]) == 6
