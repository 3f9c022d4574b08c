"""The service's parts on their own: OpenAI messages -> context and query, bearer keys,
the bounded queue, per-request limits through the engine, and OpenTelemetry spans (GenAI
semantic conventions) read with the SDK's in-memory exporter, the file store's load, and the
event loop's lag probe and garbage collection counters."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from _events_factory import call_finish
from conftest import open_sim, sim_config
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rlm_async._events import CallFinish
from rlm_async._governor import BudgetLedger, BudgetLimits
from rlm_async._rlm import RLM
from rlm_async.exceptions import ConfigError
from rlm_async.serve import KeyRing, load_serve_config
from rlm_async.serve._admission import Admission
from rlm_async.serve._errors import APIError
from rlm_async.serve._files import FileStore
from rlm_async.serve._gc_times import GcTimes
from rlm_async.serve._jobs import Entry, Gap, Job
from rlm_async.serve._loop_lag import LoopLag
from rlm_async.serve._metrics import Metrics
from rlm_async.serve._openai import RESPOND_PROMPT, parse_chat_request
from rlm_async.serve._otel import SpanSink
from rlm_async.sim import Policies, PolicySpec, SimConfig

SIM_TOML = Path(__file__).resolve().parent.parent / "configs" / "sim.toml"


class TestMessagesToContext:
    def test_last_user_message_is_the_query_and_one_earlier_message_a_str(self) -> None:
        """Two messages: the first is the context (a str), the last user message the query."""
        chat = parse_chat_request(
            {
                "model": "m",
                "messages": [{"role": "system", "content": "DOC"}, {"role": "user", "content": "Q?"}],
            }
        )
        assert chat.context.inline == "DOC" and chat.query == "Q?"

    def test_several_earlier_messages_are_a_list(self) -> None:
        """Several messages before the query: a list of str, text content parts joined."""
        chat = parse_chat_request(
            {
                "model": "m",
                "messages": [
                    {"role": "user", "content": "a"},
                    {
                        "role": "assistant",
                        "content": [{"type": "text", "text": "b"}, {"type": "text", "text": "c"}],
                    },
                    {"role": "user", "content": "Q?"},
                ],
            }
        )
        assert chat.context.inline == ["a", "bc"] and chat.query == "Q?"

    def test_a_single_user_message_is_the_context_and_the_root_responds_to_it(self) -> None:
        """One user message: its content is the context; the query asks the root to respond."""
        chat = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "Hello there"}]})
        assert chat.context.inline == "Hello there" and chat.query == RESPOND_PROMPT

    def test_the_extension_names_the_context(self) -> None:
        """rlm.file_id or rlm.context replaces the messages as the context; limits are read."""
        chat = parse_chat_request(
            {
                "model": "m",
                "messages": [{"role": "user", "content": "Q?"}],
                "rlm": {"file_id": "file-abc", "context_format": "json", "max_depth": 2, "max_usd": 0.5},
            }
        )
        assert chat.context.file_id == "file-abc" and chat.context.file_format == "json"
        assert chat.options.max_depth == 2 and chat.options.max_usd == 0.5 and chat.query == "Q?"

    @pytest.mark.parametrize(
        ("body", "param"),
        [
            ({"messages": [{"role": "user", "content": "x"}]}, "model"),
            ({"model": "m", "messages": "hi"}, "messages"),
            ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
            (
                {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                "messages[0].content",
            ),
            (
                {"model": "m", "messages": [{"role": "user", "content": "x"}], "rlm": {"max_depth": 0}},
                "rlm.max_depth",
            ),
            ({"model": "m", "messages": [{"role": "user", "content": "x"}], "rlm": {"bogus": 1}}, "rlm"),
        ],
    )
    def test_bad_requests_name_the_parameter(self, body: dict[str, object], param: str) -> None:
        """Each malformed request is a 400 naming the parameter to fix."""
        with pytest.raises(APIError) as raised:
            parse_chat_request(body)
        assert raised.value.status == 400 and raised.value.param == param


class TestServeConfig:
    @pytest.mark.parametrize(
        ("setting", "said"),
        [
            ("port = 65536", "[serve] port must be a whole number from 0 to 65535"),
            ("port = true", "[serve] port must be a whole number from 0 to 65535"),
            ("max_body_bytes = 0", "[serve] max_body_bytes must be a whole number of bytes >= 1, not 0"),
            ("max_file_bytes = -5", "[serve] max_file_bytes must be a whole number of bytes >= 1, not -5"),
            ("max_file_bytes = 1.5", "[serve] max_file_bytes must be a whole number of bytes >= 1, not 1.5"),
            ("max_events = 0", "[serve] max_events must be a whole number >= 1 (events kept per job), not 0"),
            ("max_events = 2.5", "[serve] max_events must be a whole number >= 1"),
            ("grace_s = -1", "[serve] grace_s must be seconds >= 0"),
            ("grace_s = nan", "[serve] grace_s must be seconds >= 0"),
        ],
    )
    def test_a_setting_the_server_cannot_use_stops_the_start_by_name(
        self, tmp_path: Path, setting: str, said: str
    ) -> None:
        """Sizes, the grace period and the port are checked where the file is read; before,
        a negative grace or a zero body limit started a server that misbehaved later."""
        path = tmp_path / "serve.toml"
        path.write_text(f"[serve]\n{setting}\n" + SIM_TOML.read_text())
        with pytest.raises(ConfigError) as caught:
            load_serve_config(path)
        assert said in str(caught.value)

    def test_the_limits_at_their_edges_are_accepted(self, tmp_path: Path) -> None:
        path = tmp_path / "serve.toml"
        path.write_text("[serve]\nport = 0\ngrace_s = 0\nmax_body_bytes = 1\n" + SIM_TOML.read_text())
        config = load_serve_config(path)
        assert (config.port, config.grace_s, config.max_body_bytes) == (0, 0, 1)


class TestKeyRing:
    def test_keys_map_to_tenants(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """`tenant:key` entries name tenants; a bare key gets a hashed name; a wrong or
        missing key, or another scheme, is refused."""
        monkeypatch.setenv("RLM_TEST_KEYS", "alice:0123456789abcdef0123,fedcba9876543210fedc")
        ring = KeyRing.load(env="RLM_TEST_KEYS")
        assert len(ring) == 2
        tenant = ring.authenticate("Bearer 0123456789abcdef0123")
        assert tenant is not None and tenant.name == "alice"
        other = ring.authenticate("bearer fedcba9876543210fedc")
        assert other is not None and other.name.startswith("key-")
        assert ring.authenticate("Bearer 0123456789abcdef012") is None
        assert ring.authenticate(None) is None
        assert ring.authenticate("Basic 0123456789abcdef0123") is None

    def test_short_keys_and_unreadable_files_are_config_errors(self, tmp_path: os.PathLike[str]) -> None:
        """A key under 16 characters, or a keys file that cannot be read, stops the start."""
        bad = os.path.join(tmp_path, "keys")
        with open(bad, "w") as f:
            f.write("bob:short\n")
        with pytest.raises(ConfigError, match="shorter than 16"):
            KeyRing.load(env=None, file=bad)
        with pytest.raises(ConfigError, match="cannot be read"):
            KeyRing.load(env=None, file=os.path.join(tmp_path, "missing"))

    def test_no_keys_means_one_anonymous_tenant(self) -> None:
        """With no keys configured every request is the local tenant."""
        ring = KeyRing({})
        assert not ring.enabled
        tenant = ring.authenticate(None)
        assert tenant is not None and tenant.name == "local"


class TestAdmission:
    @pytest.mark.anyio
    async def test_the_queue_is_bounded(self) -> None:
        """running + queued beyond the bounds is a 429 with retry-after; leaving frees a place."""
        admission = Admission(max_running=1, max_queued=1)
        admission.admit()
        admission.admit()
        with pytest.raises(APIError) as raised:
            admission.admit()
        assert raised.value.status == 429 and int(raised.value.headers["retry-after"]) >= 1
        async with admission.slot():
            assert admission.running == 1 and admission.queued == 1
        assert admission.admitted == 1
        admission.admit()
        admission.closed = True
        with pytest.raises(APIError) as closed:
            admission.admit()
        assert closed.value.status == 503


class TestPerQueryLimitsThroughTheEngine:
    @pytest.mark.asyncio
    async def test_budget_override_and_parent_ledger(self) -> None:
        """acompletion(budget=..., ledger_parent=...): the query's caps are the request's,
        and its spend is charged to the parent ledger (a tenant's) as well."""
        async with open_sim() as sim:
            tenant = BudgetLedger(BudgetLimits(max_usd=10.0), name="tenant")
            async with RLM(config=sim_config(sim)) as rlm:
                result = await rlm.acompletion(
                    "alpha\nbeta\ngamma",
                    "What is here?",
                    budget=BudgetLimits(max_calls=1),
                    ledger_parent=tenant,
                )
            assert result.status == "budget_exceeded" and result.limit_hit == "calls"
            assert tenant.spent.calls == result.total.calls >= 1


class TestOpenTelemetry:
    @pytest.mark.asyncio
    async def test_spans_follow_the_genai_conventions_and_nest(self) -> None:
        """The query is an invoke_agent span; each REPL cell an execute_tool span under it;
        each model call a chat span with usage; a child RLM's invoke_agent span nests under
        the cell that started it, and its calls under it."""
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        policies = Policies(root=PolicySpec(name="rlm", options={"chunks": 2, "fanout": "rlm_query_batched"}))
        async with open_sim(SimConfig(policies=policies)) as sim:
            async with RLM(config=sim_config(sim, max_depth=2)) as rlm:
                result = await rlm.acompletion(
                    "one\ntwo\nthree\nfour", "What is here?", event_sinks=[SpanSink(provider)]
                )
        assert result.status == "ok"
        spans = exporter.get_finished_spans()
        by_id = {s.context.span_id: s for s in spans}
        agents = [
            s for s in spans if s.attributes and s.attributes["gen_ai.operation.name"] == "invoke_agent"
        ]
        chats = [s for s in spans if s.attributes and s.attributes["gen_ai.operation.name"] == "chat"]
        tools = [s for s in spans if s.attributes and s.attributes["gen_ai.operation.name"] == "execute_tool"]
        roots = [s for s in agents if s.parent is None]
        assert len(roots) == 1 and roots[0].name == "invoke_agent rlm"
        children = [s for s in agents if s.parent is not None]
        assert len(children) == 2  # two chunks, one child RLM each
        for child in children:
            assert child.parent is not None
            parent = by_id[child.parent.span_id]
            assert parent.name == "execute_tool repl"
        assert tools and all(t.attributes and t.attributes["gen_ai.tool.name"] == "repl" for t in tools)
        assert len(chats) == result.total.calls
        assert all(c.name.startswith("chat sim-") for c in chats)
        assert all(c.attributes and int(str(c.attributes["gen_ai.usage.input_tokens"])) > 0 for c in chats)
        depth_of = {s.context.span_id: s.attributes.get("rlm.depth") for s in agents if s.attributes}
        child_ids = {c.context.span_id for c in children}
        under_children = [c for c in chats if c.parent is not None and c.parent.span_id in child_ids]
        assert under_children and all(depth_of[c.parent.span_id] == 1 for c in under_children if c.parent)


class TestJobFeed:
    @staticmethod
    def _call_finish() -> CallFinish:
        return call_finish(0.0, "c1", prompt_tokens=100, completion_tokens=10, cost_usd=0.001, latency_s=0.1)

    @pytest.mark.asyncio
    async def test_a_job_feeds_progress_and_counts_usage(self) -> None:
        """A job (or a streamed completion) turns a call's event into a progress record
        and adds its usage."""
        job = Job(kind="job", tenant="t", model="m")
        job.sink(self._call_finish())
        assert [name for _, name, _ in job.feed] == ["progress"]
        assert job.usage.prompt_tokens == 100 and job.usage.calls == 1

    @pytest.mark.asyncio
    async def test_an_unstreamed_completion_counts_usage_without_a_feed(self) -> None:
        """A chat completion that is not streamed keeps no progress records (no one reads
        them) but still counts what each call spent, and its status and end are fed."""
        job = Job(kind="chat", tenant="t", model="m", progress=False)
        job.sink(self._call_finish())
        assert not job.feed
        assert job.usage.prompt_tokens == 100 and job.usage.calls == 1
        job.set_running()
        assert [name for _, name, _ in job.feed] == ["status"]


class TestFollowingAFeed:
    """`Job.follow`: what both event streams read (the jobs API's, and a streamed chat
    completion's progress)."""

    @staticmethod
    async def _read(job: Job, after: int = 0) -> list[Entry | Gap]:
        return [item async for item in job.follow(after)]

    @pytest.mark.anyio
    async def test_a_reader_that_falls_behind_gets_a_gap_then_the_newest(self) -> None:
        """With room for three, a reader from the start is told how many it missed and the
        next sequence, then gets the three kept; one that read up to them gets no gap."""
        job = Job(kind="chat", tenant="t", model="m", max_events=3)
        for _ in range(5):
            job.sink(TestJobFeed._call_finish())
        job.fail("stopped")  # the sixth entry: "done"
        items = await self._read(job)
        assert items[0] == Gap(missed=3, after=0, next=4)
        assert [item[0] for item in items[1:] if not isinstance(item, Gap)] == [4, 5, 6]
        assert [i[1] for i in items[1:] if not isinstance(i, Gap)] == ["progress", "progress", "done"]
        assert not any(isinstance(item, Gap) for item in await self._read(job, after=4))
        assert await self._read(job, after=6) == []

    @pytest.mark.anyio
    async def test_it_follows_a_running_job_to_its_end(self) -> None:
        """Entries added while the reader waits reach it, in order, and it stops at `done`."""
        job = Job(kind="job", tenant="t", model="m")
        seen: list[Entry | Gap] = []

        async def read() -> None:
            seen.extend(await self._read(job))

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await anyio.lowlevel.checkpoint()
            job.set_running()
            await anyio.lowlevel.checkpoint()
            job.sink(TestJobFeed._call_finish())
            job.fail("stopped")
        assert [item[1] for item in seen if not isinstance(item, Gap)] == ["status", "progress", "done"]


class TestFileStoreLoad:
    """`FileStore.load`: the owner's check and the read in one trip to a thread, with the
    same answers as before: another tenant's file is a 404, bytes that are not UTF-8 or
    JSON that is not a context a 400 naming the file."""

    @staticmethod
    async def _saved(store: FileStore, body: bytes, tenant: str = "alice") -> str:
        async def chunks() -> AsyncIterator[bytes]:
            yield body

        record = await store.save(chunks(), tenant=tenant, filename="ctx.txt", declared=len(body))
        return str(record["id"])

    @pytest.mark.anyio
    async def test_the_owner_reads_text_and_json(self, tmp_path: Path) -> None:
        store = FileStore(tmp_path, max_bytes=1 << 20)
        file_id = await self._saved(store, b'["a", "b"]')
        assert await store.load(file_id, tenant="alice", fmt="text") == '["a", "b"]'
        assert await store.load(file_id, tenant="alice", fmt="json") == ["a", "b"]

    @pytest.mark.anyio
    async def test_another_tenants_file_and_a_missing_one_do_not_exist(self, tmp_path: Path) -> None:
        store = FileStore(tmp_path, max_bytes=1 << 20)
        file_id = await self._saved(store, b"secret")
        for other, tenant in ((file_id, "bob"), ("file-" + "0" * 24, "alice"), ("../etc/passwd", "alice")):
            with pytest.raises(APIError) as caught:
                await store.load(other, tenant=tenant, fmt="text")
            assert caught.value.status == 404 and caught.value.param == "file_id"

    @pytest.mark.anyio
    async def test_bad_bytes_and_bad_json_are_400s_naming_the_file(self, tmp_path: Path) -> None:
        store = FileStore(tmp_path, max_bytes=1 << 20)
        latin1 = await self._saved(store, "caf\xe9".encode("latin-1"))
        with pytest.raises(APIError, match=f"file {latin1} is not UTF-8 text") as caught:
            await store.load(latin1, tenant="alice", fmt="text")
        assert caught.value.status == 400
        broken = await self._saved(store, b"[1, 2")
        with pytest.raises(APIError, match=f"file {broken} is not a usable JSON context") as caught:
            await store.load(broken, tenant="alice", fmt="json")
        assert caught.value.status == 400
        number = await self._saved(store, b"42")
        with pytest.raises(APIError, match="holds a JSON int; use a list, an object or a string"):
            await store.load(number, tenant="alice", fmt="json")


class TestLoopLag:
    """`rlm_event_loop_lag_seconds`: how late the service's loop wakes from its probe sleep."""

    @pytest.mark.anyio
    async def test_each_wake_up_lands_in_its_bucket(self) -> None:
        """Driven by a fake clock: sleeps of 50 ms that took 50, 53, 120 and 700 ms."""
        now = [0.0]
        took = iter([0.05, 0.053, 0.12, 0.7])

        async def sleep(seconds: float) -> None:
            assert seconds == 0.05
            try:
                now[0] += next(took)
            except StopIteration:
                raise anyio.get_cancelled_exc_class() from None
            await anyio.lowlevel.checkpoint()

        lag = LoopLag(0.05, clock=lambda: now[0], sleep=sleep)
        with pytest.raises(anyio.get_cancelled_exc_class()):
            await lag.watch()
        assert lag.count == 4 and lag.sum_s == pytest.approx(0.003 + 0.07 + 0.65)
        buckets = dict(lag.cumulative())
        # On time (0 s), 3 ms, 70 ms, 650 ms late: at most 1 ms, 5 ms, 100 ms, 1 s.
        assert buckets["0.001"] == 1 and buckets["0.005"] == 2 and buckets["0.05"] == 2
        assert buckets["0.1"] == 3 and buckets["0.5"] == 3 and buckets["1.0"] == 4 and buckets["+Inf"] == 4

    @pytest.mark.anyio
    async def test_a_blocked_loop_shows_as_lag(self) -> None:
        """On the real clock: code that holds the loop for 0.3 s makes the probe's wake-up
        at least 0.25 s late (its 50 ms sleep began before the block)."""
        lag = LoopLag(0.05)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lag.watch)
            await anyio.sleep(0.01)  # the probe is asleep
            time.sleep(0.3)  # noqa: ASYNC251 -- the point: nothing else runs meanwhile
            await anyio.sleep(0.12)  # the probe wakes, records, sleeps and wakes again
            tg.cancel_scope.cancel()
        assert lag.count >= 1 and lag.count == sum(lag.counts)
        late = dict(lag.cumulative())
        assert late["+Inf"] - late["0.25"] >= 1, lag.counts  # one wake-up over 0.25 s late

    def test_metrics_render_it_as_a_prometheus_histogram(self) -> None:
        metrics = Metrics()
        assert "rlm_event_loop_lag_seconds" not in metrics.render()  # no probe, no family
        metrics.loop_lag = lag = LoopLag(0.05)
        for seconds in (0.0, 0.02, 3.0):
            lag.record(seconds)
        lines = metrics.render().splitlines()
        assert "# TYPE rlm_event_loop_lag_seconds histogram" in lines
        assert 'rlm_event_loop_lag_seconds_bucket{le="0.001"} 1' in lines
        assert 'rlm_event_loop_lag_seconds_bucket{le="0.025"} 2' in lines
        assert 'rlm_event_loop_lag_seconds_bucket{le="2.5"} 2' in lines
        assert 'rlm_event_loop_lag_seconds_bucket{le="+Inf"} 3' in lines
        assert (
            "rlm_event_loop_lag_seconds_sum 3.02" in lines and "rlm_event_loop_lag_seconds_count 3" in lines
        )

    def test_a_probe_interval_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="interval_s must be > 0"):
            LoopLag(0.0)


class TestGcTimes:
    """`rlm_gc_collections_total` and `rlm_gc_seconds_total`, from `gc.callbacks`."""

    def test_each_collection_is_counted_with_its_time(self) -> None:
        now = [10.0]
        times = GcTimes(clock=lambda: now[0])
        times("start", {"generation": 2})
        now[0] += 0.06
        times("stop", {"generation": 2, "collected": 5, "uncollectable": 0})
        times("start", {"generation": 0})
        now[0] += 0.001
        times("stop", {"generation": 0, "collected": 0, "uncollectable": 0})
        assert times.collections == [1, 0, 1]
        assert times.seconds[2] == pytest.approx(0.06) and times.seconds[0] == pytest.approx(0.001)

    def test_installed_it_sees_real_collections_and_removed_it_stops(self) -> None:
        times = GcTimes()
        times.install()
        try:
            times.install()  # once only
            assert gc.callbacks.count(times) == 1
            gc.collect()
            assert times.collections[2] >= 1 and times.seconds[2] > 0
        finally:
            times.remove()
        seen = list(times.collections)
        gc.collect()
        assert times.collections == seen and times not in gc.callbacks

    def test_metrics_render_them_by_generation(self) -> None:
        metrics = Metrics()
        assert "rlm_gc_" not in metrics.render()
        metrics.gc_times = times = GcTimes()
        times.collections = [7, 2, 1]
        times.seconds = [0.01, 0.005, 0.07]
        lines = metrics.render().splitlines()
        assert "# TYPE rlm_gc_collections_total counter" in lines
        assert 'rlm_gc_collections_total{generation="2"} 1' in lines
        assert 'rlm_gc_seconds_total{generation="2"} 0.07' in lines
