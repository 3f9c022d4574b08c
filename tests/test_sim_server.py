"""The simulated server over real HTTP: the OpenAI surface, errors, the request log, concurrency."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import httpx
import pytest

from rlm_async._prompts import root_system_prompt, sub_system_prompt
from rlm_async._types import Message, ModelRequest
from rlm_async.exceptions import AuthenticationFailed, BadRequest, ContextLengthExceeded, ModelNotFound
from rlm_async.sim import (
    KindLatency,
    LatencyModel,
    Policies,
    PolicySpec,
    RequestLog,
    SimConfig,
    SimServer,
    prompt_tokens,
)
from rlm_async.transport import OpenAITransport

pytestmark = pytest.mark.anyio


def req(
    text: str = "hello", *, model: str = "sim-model", system: str | None = None, **kw: object
) -> ModelRequest:
    messages = ((Message("system", system),) if system else ()) + (Message("user", text),)
    return ModelRequest(model=model, messages=messages, **kw)  # type: ignore[arg-type]


async def raw_post(port: int, payload: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a fresh connection, without a client library's pool: lets a
    test open 1000 connections at once cheaply."""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(payload)
    )
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(head + payload)
        chunks = []
        try:
            while True:
                chunks.append(await stream.receive())
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass
    data = b"".join(chunks)
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


class TestOpenAISurface:
    async def test_completion_carries_text_usage_and_finish_reason(self) -> None:
        """A chat completion returns the policy's text, usage from the documented tokenizer, and "stop"."""
        async with SimServer() as sim:
            transport = OpenAITransport(sim.base_url)
            request = req("hello there")
            completion = await transport.complete(request)
            await transport.aclose()
        assert completion.text == "ECHO: hello there"
        assert completion.finish_reason == "stop" and completion.model == "sim-model"
        assert completion.usage.prompt_tokens == prompt_tokens(request.messages)
        assert completion.usage.completion_tokens == -(-len(completion.text) // 4)
        assert completion.usage.cached_tokens == 0

    async def test_models_endpoint_lists_configured_models(self) -> None:
        """GET /v1/models lists the configured names; GET /v1/models/{id} finds one or 404s."""
        async with (
            SimServer(SimConfig(models=("big", "small"))) as sim,
            httpx.AsyncClient(base_url=sim.base_url) as c,
        ):
            listing = (await c.get("/models")).json()
            one = await c.get("/models/small")
            missing = await c.get("/models/nope")
        assert [m["id"] for m in listing["data"]] == ["big", "small"] and listing["object"] == "list"
        assert one.json()["id"] == "small" and missing.status_code == 404

    async def test_unknown_model_is_404_model_not_found(self) -> None:
        """An unknown model answers 404 with code model_not_found, raised as ModelNotFound."""
        async with SimServer() as sim:
            transport = OpenAITransport(sim.base_url)
            with pytest.raises(ModelNotFound, match="model_not_found"):
                await transport.complete(req(model="gpt-nothing"))
            await transport.aclose()
        assert sim.log.entries[0].outcome == "not_found" and sim.log.entries[0].status == 404

    async def test_bad_json_is_400_with_an_error_body(self) -> None:
        """A body that is not JSON answers 400 with an OpenAI-style error object."""
        async with SimServer() as sim:
            assert sim.port is not None
            status, body = await raw_post(sim.port, b"{not json")
        assert status == 400 and "could not parse the JSON body" in json.loads(body)["error"]["message"]
        assert sim.log.entries[0].outcome == "bad_request"

    async def test_api_key_is_enforced_when_configured(self) -> None:
        """With an api_key configured, a wrong key is 401 (AuthenticationFailed) and the right one works."""
        async with SimServer(SimConfig(api_key="sk-sim")) as sim:
            wrong = OpenAITransport(sim.base_url, api_key="sk-wrong")
            right = OpenAITransport(sim.base_url, api_key="sk-sim")
            with pytest.raises(AuthenticationFailed):
                await wrong.complete(req())
            assert (await right.complete(req())).text.startswith("ECHO")
            await wrong.aclose()
            await right.aclose()

    async def test_context_window_and_max_tokens(self) -> None:
        """Prompt + max_tokens over context_window is 400 context_length_exceeded; a reply longer
        than max_tokens is cut to it with finish_reason "length"."""
        config = SimConfig(
            context_window=1000,
            policies=Policies(other=PolicySpec(name="endless", options={"chars": 10_000})),
        )
        async with SimServer(config) as sim:
            transport = OpenAITransport(sim.base_url)
            with pytest.raises(ContextLengthExceeded):
                await transport.complete(req("x" * 4000, max_tokens=10))
            cut = await transport.complete(req("short", max_tokens=50))
            with pytest.raises(BadRequest):
                await transport.complete(req("short", max_tokens=0))
            await transport.aclose()
        assert cut.finish_reason == "length" and cut.usage.completion_tokens == 50 and len(cut.text) == 200


class TestRequestLog:
    async def test_log_records_kind_tokens_and_order_and_is_written_as_jsonl(self, tmp_path: Path) -> None:
        """Each request is logged with its kind (from the system prompt), tokens, status and
        times; the JSONL file holds the same records."""
        path = tmp_path / "log.jsonl"
        config = SimConfig(latency=LatencyModel(root=KindLatency(ttft_s=0.05)), log_path=str(path))
        async with SimServer(config) as sim:
            transport = OpenAITransport(sim.base_url)
            await transport.complete(req("Query: what?", system=root_system_prompt(), max_tokens=500))
            await transport.complete(req("TASK ask\nSay hi.", system=sub_system_prompt()))
            await transport.complete(req("plain"))
            await transport.aclose()
        entries = sim.log.by_arrival()
        assert [e.kind for e in entries] == ["root", "sub", "other"]
        assert [e.policy for e in entries] == ["rlm", "reader", "echo"]
        assert [e.seq for e in entries] == [0, 1, 2]
        assert all(e.status == 200 and e.outcome == "ok" for e in entries)
        root = entries[0]
        assert root.start is not None and root.finish is not None
        assert root.max_tokens == 500 and root.prompt_tokens > 0 and root.completion_tokens > 0
        assert root.arrival <= root.start <= root.finish and root.finish - root.start >= 0.049
        assert RequestLog.load(path).entries == sim.log.entries
        assert sim.log.totals()["requests"] == 3

    async def test_sim_endpoints_serve_the_log_and_reset(self) -> None:
        """GET /sim/log returns the log as JSONL; POST /sim/reset clears it."""
        async with SimServer() as sim:
            transport = OpenAITransport(sim.base_url)
            await transport.complete(req())
            await transport.aclose()
            root = sim.base_url.removesuffix("/v1")
            async with httpx.AsyncClient(base_url=root) as client:
                lines = (await client.get("/sim/log")).text.splitlines()
                await client.post("/sim/reset")
            assert len(lines) == 1 and json.loads(lines[0])["outcome"] == "ok"
            assert len(sim.log) == 0

    async def test_the_jsonl_file_reads_back_as_the_log_for_odd_names_and_recorded_bodies(
        self, tmp_path: Path
    ) -> None:
        """The file (orjson lines, `json` where orjson would differ) loads back equal to the
        log in memory: a non-ASCII model name and cache key, and recorded bodies holding NaN
        and an integer over 64 bits."""
        for record in (False, True):
            path = tmp_path / f"log-{record}.jsonl"
            config = SimConfig(models=("modèle-ü",), record_bodies=record, log_path=str(path))
            async with SimServer(config) as sim, httpx.AsyncClient(base_url=sim.base_url) as client:
                body = '{"model":"modèle-ü","messages":[{"role":"user","content":"€ hi"}],'
                for extra in (
                    '"prompt_cache_key":"clé-😀"}',
                    '"temperature":NaN,"seed":123456789012345678901234}',
                ):
                    response = await client.post("/chat/completions", content=(body + extra).encode())
                    assert response.status_code == 200
            loaded = RequestLog.load(path).entries
            assert [e.to_dict() | {"body": None} for e in loaded] == [
                e.to_dict() | {"body": None} for e in sim.log.entries
            ]
            assert loaded[0].model == "modèle-ü" and loaded[0].prompt_cache_key == "clé-😀"
            if record:
                assert (
                    loaded[1].body is not None
                    and loaded[1].body["temperature"] != loaded[1].body["temperature"]
                )
                assert loaded[1].body["seed"] == 123456789012345678901234


class TestConcurrency:
    async def test_a_thousand_concurrent_requests_are_all_in_flight_at_once(self) -> None:
        """1000 simultaneous requests are all inside the server together (counted at arrival)
        and all answered."""
        n = 1000
        config = SimConfig(latency=LatencyModel(sub=KindLatency(ttft_s=1.0)))
        statuses: list[int] = []
        async with SimServer(config) as sim:
            port = sim.port
            assert port is not None

            async def one(i: int) -> None:
                body = json.dumps({"model": "sim-model", "messages": [{"role": "user", "content": f"q{i}"}]})
                status, _ = await raw_post(port, body.encode())
                statuses.append(status)

            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(one, i)
        assert statuses == [200] * n
        assert len(sim.log) == n
        assert sim.log.max_in_flight() == n
        assert sim.log.peak_concurrency(phase="service") == n

    async def test_capacity_serves_requests_in_fifo_order(self) -> None:
        """With capacity 2, six simultaneous requests are served two at a time, in arrival order."""
        config = SimConfig(latency=LatencyModel(sub=KindLatency(ttft_s=0.1, capacity=2)))
        async with SimServer(config) as sim:
            transport = OpenAITransport(sim.base_url)
            async with anyio.create_task_group() as tg:
                for i in range(6):
                    tg.start_soon(transport.complete, req(f"q{i}"))
            await transport.aclose()
        entries = sim.log.by_arrival()
        assert sim.log.peak_concurrency(phase="service") == 2
        assert sim.log.max_in_flight() == 6  # the rest waited inside the server
        starts = [e.start for e in entries]
        assert all(t is not None for t in starts)
        assert starts == sorted(t for t in starts if t is not None)  # FIFO: service starts in arrival order
        first, second, third = entries[0], entries[1], entries[2]
        assert first.finish is not None and second.finish is not None and third.start is not None
        assert third.start >= min(first.finish, second.finish)  # the third waited for a slot
        assert entries[5].queue_s > entries[0].queue_s

    async def test_root_and_sub_have_separate_capacity(self) -> None:
        """A full sub-call queue does not hold up a root turn: each kind has its own capacity."""
        config = SimConfig(
            latency=LatencyModel(
                root=KindLatency(ttft_s=0.05, capacity=1), sub=KindLatency(ttft_s=0.3, capacity=1)
            )
        )
        async with SimServer(config) as sim:
            transport = OpenAITransport(sim.base_url)
            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(transport.complete, req(f"TASK ask\n{i}", system=sub_system_prompt()))
                await anyio.sleep(0.05)
                await transport.complete(req("Query: x", system=root_system_prompt()))
            await transport.aclose()
        root = sim.log.of_kind("root")[0]
        subs = sim.log.of_kind("sub")
        assert root.start is not None and root.finish is not None
        assert root.start < max(s.start or 0.0 for s in subs)  # it did not queue behind the sub-calls
        assert root.finish < max(s.finish or 0.0 for s in subs)
