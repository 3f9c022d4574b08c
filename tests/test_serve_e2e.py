"""The service end to end: a live `rlm-async serve` on loopback (the simulator in-process
behind it), driven by real clients — the official openai SDK (sync and async, streaming
and not), curl, and raw HTTP for the jobs API, files and the failure cases. Every bad
request must get OpenAI's error body with the right status while the server keeps serving.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from _serve_server import ServerProcess, config_text
from openai.types.chat import ChatCompletionMessageParam

from rlm_async._trace import load_trace

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONTEXT = "\n".join(f"Line {i}: the invoice for order {i} was paid on day {i % 28 + 1}." for i in range(400))


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess(config_text()) as s:
        yield s


def _client(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.root_url, timeout=60)


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    error: dict[str, Any] = body["error"]
    return error


def _still_serving(server: ServerProcess) -> None:
    with _client(server) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        r = c.post(
            "/v1/chat/completions",
            json={"model": "rlm", "messages": [{"role": "user", "content": "hi there"}]},
        )
        assert r.status_code == 200, r.text


# ============================================================================ openai SDK


class TestOpenAISDK:
    def test_sync_completion_from_plain_messages(self, server: ServerProcess) -> None:
        """The SDK's sync client gets a chat.completion: earlier messages are the context,
        the last user message the query, usage with cached tokens and the RLM's status."""
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="anything",
            messages=[
                {"role": "user", "content": CONTEXT},
                {"role": "user", "content": "Which orders were paid?"},
            ],
        )
        assert reply.object == "chat.completion"
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage is not None and reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
        assert reply.usage.prompt_tokens_details is not None
        extra = reply.model_extra or {}
        assert extra["rlm"]["status"] == "ok"

    def test_sync_stream_parses_unchanged(self, server: ServerProcess) -> None:
        """stream=True: the SDK parses every chunk (progress rides in SSE comments, which it
        skips), the content adds up to the non-streamed answer, usage is in the last chunk."""
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        messages: list[ChatCompletionMessageParam] = [
            {"role": "user", "content": CONTEXT},
            {"role": "user", "content": "Which orders were paid?"},
        ]
        plain = client.chat.completions.create(model="rlm", messages=messages)
        chunks = list(client.chat.completions.create(model="rlm", messages=messages, stream=True))
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == plain.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0

    def test_stream_with_include_usage_ends_with_a_usage_chunk(self, server: ServerProcess) -> None:
        """stream_options.include_usage: OpenAI's shape, a last chunk with no choices and the usage."""
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        chunks = list(
            client.chat.completions.create(
                model="rlm",
                messages=[{"role": "user", "content": "Summarise: the sky is blue."}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-2].usage is None

    @pytest.mark.anyio
    async def test_async_client_streaming_and_not(self, server: ServerProcess) -> None:
        """The SDK's async client, both ways, with the rlm extension naming the context."""
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        try:
            reply = await client.chat.completions.create(
                model="rlm",
                messages=[{"role": "user", "content": "Which orders were paid?"}],
                extra_body={"rlm": {"context": CONTEXT, "max_depth": 1}},
            )
            assert reply.choices[0].message.content
            stream = await client.chat.completions.create(
                model="rlm",
                messages=[{"role": "user", "content": "Which orders were paid?"}],
                stream=True,
                extra_body={"rlm": {"context": CONTEXT}},
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text == reply.choices[0].message.content
        finally:
            await client.close()

    def test_named_progress_events_on_request(self, server: ServerProcess) -> None:
        """rlm.progress = "events" sends progress as named `rlm.progress` events (for
        clients that read them) before the chunks; the default sends SSE comments."""
        body = {
            "model": "rlm",
            "stream": True,
            "messages": [{"role": "user", "content": CONTEXT}, {"role": "user", "content": "Which orders?"}],
        }
        with _client(server) as c:
            named = c.post("/v1/chat/completions", json={**body, "rlm": {"progress": "events"}}).text
            default = c.post("/v1/chat/completions", json=body).text
        assert "event: rlm.progress" in named and '"kind": "call.finish"' in named
        assert "event:" not in default and ": rlm.progress " in default
        assert default.rstrip().endswith("data: [DONE]")


# ============================================================================ curl


class TestCurl:
    def test_curl_completion_and_stream(self, server: ServerProcess) -> None:
        """The documented curl commands work: a JSON answer, and an SSE stream ending in [DONE]."""
        curl = shutil.which("curl")
        if curl is None:
            pytest.skip("curl is not installed")
        body = json.dumps(
            {"model": "rlm", "messages": [{"role": "user", "content": "What is in this note? Milk, eggs."}]}
        )
        out = subprocess.run(
            [
                curl,
                "-sS",
                f"{server.base_url}/chat/completions",
                "-H",
                "Content-Type: application/json",
                "-d",
                body,
            ],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        assert json.loads(out)["choices"][0]["message"]["content"]
        streamed = subprocess.run(
            [
                curl,
                "-sSN",
                f"{server.base_url}/chat/completions",
                "-H",
                "Content-Type: application/json",
                "-d",
                json.dumps({**json.loads(body), "stream": True}),
            ],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout.decode()
        assert streamed.rstrip().endswith("data: [DONE]")


# ============================================================================ jobs


def _wait_job(c: httpx.Client, job_id: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record: dict[str, Any] = c.get(f"/v1/rlm/jobs/{job_id}").json()
        if record["state"] in ("completed", "cancelled", "failed"):
            return record
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def _sse(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":") or ":" not in line:
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        if fields:
            events.append(fields)
    return events


class TestJobs:
    def test_job_lifecycle_and_resumable_events(self, server: ServerProcess) -> None:
        """POST gives 202 and an id; GET shows the answer and usage; the events stream has
        numbered events, and reconnecting with Last-Event-ID resumes after the given one
        (one that is not a number, or past the last event sent, is a 400)."""
        with _client(server) as c:
            r = c.post(
                "/v1/rlm/jobs", json={"model": "rlm", "context": CONTEXT, "query": "Which orders were paid?"}
            )
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            assert r.headers["location"] == f"/v1/rlm/jobs/{job_id}"
            record = _wait_job(c, job_id)
            assert record["state"] == "completed" and record["status"] == "ok" and record["answer"]
            assert record["usage"]["rlm_calls"] > 0
            events = _sse(c.get(f"/v1/rlm/jobs/{job_id}/events").text)
            ids = [int(e["id"]) for e in events]
            assert ids == sorted(ids) and events[-1]["event"] == "done"
            resumed = _sse(
                c.get(f"/v1/rlm/jobs/{job_id}/events", headers={"Last-Event-ID": str(ids[2])}).text
            )
            assert [int(e["id"]) for e in resumed] == ids[3:]
            for bad in ("abc", "-1", "3.5", str(ids[-1] + 5)):  # not an id, or one never sent
                r = c.get(f"/v1/rlm/jobs/{job_id}/events", headers={"Last-Event-ID": bad})
                assert r.status_code == 400, (bad, r.text)
                assert "Last-Event-ID" in _error(r)["message"], r.text
            assert c.get(f"/v1/rlm/jobs/{job_id}/events", headers={"Last-Event-ID": ""}).status_code == 200

    def test_events_dropped_before_the_client_read_them_are_a_gap_event(self) -> None:
        """With `max_events = 3` a job keeps its newest three events: a client reading from
        the start gets a `gap` event first, saying how many it missed and the next id it
        will get, then those three; one resuming inside them gets no gap."""
        with ServerProcess(config_text(serve="max_events = 3")) as s, _client(s) as c:
            r = c.post("/v1/rlm/jobs", json={"model": "rlm", "context": CONTEXT, "query": "Which orders?"})
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            _wait_job(c, job_id)
            events = _sse(c.get(f"/v1/rlm/jobs/{job_id}/events").text)
            gap, kept = events[0], events[1:]
            assert gap["event"] == "gap" and "id" not in gap
            ids = [int(e["id"]) for e in kept]
            assert len(kept) == 3 and ids == list(range(ids[0], ids[0] + 3)) and kept[-1]["event"] == "done"
            assert json.loads(gap["data"]) == {"missed": ids[0] - 1, "after": 0, "next": ids[0]}
            assert ids[0] > 1  # a job sends more than three events: some were dropped
            resumed = _sse(
                c.get(f"/v1/rlm/jobs/{job_id}/events", headers={"Last-Event-ID": str(ids[0])}).text
            )
            assert [e.get("event") for e in resumed] == [e["event"] for e in kept[1:]]

    def test_job_needs_a_context_and_a_query(self, server: ServerProcess) -> None:
        """A job without a context or query is a 400 naming the field."""
        with _client(server) as c:
            r = c.post("/v1/rlm/jobs", json={"model": "rlm", "query": "?"})
            assert r.status_code == 400 and _error(r)["param"] == "context"
            r = c.post("/v1/rlm/jobs", json={"model": "rlm", "context": "x"})
            assert r.status_code == 400 and _error(r)["param"] == "query"
            assert c.get("/v1/rlm/jobs/job-doesnotexist").status_code == 404

    def test_file_context_over_the_limit_is_413_and_files_feed_jobs(self, server: ServerProcess) -> None:
        """POST /v1/files streams a body to disk; a job names it by id; a file over the limit
        is a 413, an empty one a 400, and the server keeps serving."""
        with _client(server) as c:
            r = c.post(
                "/v1/files?filename=notes.txt",
                content=CONTEXT.encode(),
                headers={"content-type": "text/plain"},
            )
            assert r.status_code == 200, r.text
            file_id = r.json()["id"]
            assert r.json()["bytes"] == len(CONTEXT.encode())
            job = c.post(
                "/v1/rlm/jobs", json={"model": "rlm", "file_id": file_id, "query": "Which orders were paid?"}
            )
            assert job.status_code == 202
            assert _wait_job(c, job.json()["id"])["status"] == "ok"
            missing = c.post("/v1/rlm/jobs", json={"model": "rlm", "file_id": "file-0000", "query": "?"})
            assert missing.status_code == 404
            empty = c.post("/v1/files", content=b"", headers={"content-type": "text/plain"})
            assert empty.status_code == 400 and "empty" in _error(empty)["message"], empty.text


def _memory(pid: int) -> dict[str, int]:
    """The kernel's account of a process's resident memory, in bytes: `RssAnon` (its own
    memory), `RssFile` (mapped file pages, the page cache's), `VmRSS` and `VmHWM` (their
    sum, now and at its peak)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


class _AnonPeak:
    """The highest `RssAnon` a process reaches while the block runs, sampled every 0.5 ms
    from /proc in a thread (a copy of a 40 MB context lives for milliseconds, at least one
    memcpy of it; a sample can miss a shorter spike, never see one that did not happen)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _memory(self.pid)["RssAnon"])
            time.sleep(0.0005)

    def __enter__(self) -> _AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class TestLargeContext:
    def test_a_40_mb_file_is_streamed_to_disk_and_held_once(self) -> None:
        """A 40 MB context uploaded with `POST /v1/files` and named by a query: the upload
        goes to disk as it arrives (the server's memory grows by a small fraction of it);
        while the query runs the server's own memory grows by one copy, the str the engine
        holds, never a second beside it (the file's bytes are decoded from a map of the page
        cache, and the worker gets the str encoded a slice at a time); once answered it
        holds none; and the worker saw every character. The peak of all resident memory
        (own + mapped file pages, `VmHWM`, reset before the query) stays under two files."""
        size = 40 << 20
        line = "Order 12345: the invoice was paid on day 17 by customer 678.\n"
        body = (line * (size // len(line) + 1))[:size].encode()
        root = '[sim.policies.root]\nname = "script"\nreplies = ["```repl\\nn = str(len(context))\\n```", "FINAL_VAR(n)"]\n'
        config = config_text().replace('[sim.policies.root]\nname = "rlm"\nchunks = 4\n', root)
        assert root in config
        with ServerProcess(config) as s, httpx.Client(base_url=s.root_url, timeout=120) as c:
            assert s.proc is not None
            pid = s.proc.pid
            before = _memory(pid)
            with _AnonPeak(pid) as upload:
                file_id = c.post("/v1/files", content=body).json()["id"]
            assert upload.peak - before["RssAnon"] < 0.1 * size
            start = _memory(pid)
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS now
            with _AnonPeak(pid) as query:
                r = c.post(
                    "/v1/chat/completions",
                    json={
                        "model": "rlm",
                        "messages": [{"role": "user", "content": "How long is it?"}],
                        "rlm": {"file_id": file_id},
                    },
                )
            after = _memory(pid)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == str(size)
        grew = query.peak - start["RssAnon"]
        assert 0.9 * size < grew < 1.3 * size, grew / size  # the str, once
        assert after["VmHWM"] - start["VmRSS"] < 2.1 * size, (after["VmHWM"] - start["VmRSS"]) / size
        assert after["RssAnon"] - start["RssAnon"] < 0.2 * size


class TestJobsAcrossRestarts:
    def test_finished_results_survive_a_restart_and_delete_cancels(self) -> None:
        """A finished job is read back after the server restarts on the same data directory;
        DELETE of a running job cancels it (workers killed, spend so far kept)."""
        data = tempfile.mkdtemp(prefix="rlm-serve-data-")
        slow = config_text(serve="grace_s = 1", sub_ttft=3.0, chunks=4)
        with ServerProcess(slow, data_dir=data) as s, _client(s) as c:
            quick = c.post(
                "/v1/rlm/jobs", json={"model": "rlm", "context": "a b c", "query": "What is this?"}
            ).json()
            done = _wait_job(c, quick["id"], 60)
            long = c.post(
                "/v1/rlm/jobs", json={"model": "rlm", "context": CONTEXT, "query": "Which orders?"}
            ).json()
            # wait until the long job's fan-out is in flight, then cancel it
            deadline = time.monotonic() + 30
            while not s.children() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            cancelled = c.delete(f"/v1/rlm/jobs/{long['id']}").json()
            assert cancelled["state"] == "cancelled"
            assert cancelled["usage"]["rlm_calls"] >= 1  # the root turns it paid for are kept
            assert s.wait_no_children() == []
        with ServerProcess(slow, data_dir=data) as s2, _client(s2) as c:
            again = c.get(f"/v1/rlm/jobs/{quick['id']}").json()
            assert again["state"] == "completed" and again["answer"] == done["answer"]
            assert c.get(f"/v1/rlm/jobs/{long['id']}").json()["state"] == "cancelled"
            replay = _sse(c.get(f"/v1/rlm/jobs/{quick['id']}/events").text)
            assert replay[-1]["event"] == "done"
        shutil.rmtree(data, ignore_errors=True)


# ============================================================================ bad input


class TestBadInput:
    def test_malformed_json_no_messages_and_bad_fields(self, server: ServerProcess) -> None:
        """Malformed JSON, no messages, no user message, n>1, a bad rlm field: each a 400
        with OpenAI's error body; the server keeps serving."""
        with _client(server) as c:
            r = c.post(
                "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
            )
            assert r.status_code == 400 and _error(r)["type"] == "invalid_request_error"
            r = c.post("/v1/chat/completions", json={"model": "rlm", "messages": []})
            assert r.status_code == 400 and _error(r)["param"] == "messages"
            r = c.post("/v1/chat/completions", json={"model": "rlm"})
            assert r.status_code == 400 and _error(r)["param"] == "messages"
            r = c.post(
                "/v1/chat/completions",
                json={"model": "rlm", "messages": [{"role": "system", "content": "x"}]},
            )
            assert r.status_code == 400
            r = c.post(
                "/v1/chat/completions",
                json={"model": "rlm", "n": 2, "messages": [{"role": "user", "content": "x"}]},
            )
            assert r.status_code == 400 and _error(r)["param"] == "n"
            r = c.post(
                "/v1/chat/completions",
                json={
                    "model": "rlm",
                    "messages": [{"role": "user", "content": "x"}],
                    "rlm": {"max_depth": 99},
                },
            )
            assert r.status_code == 400 and "limit" in _error(r)["message"]
            assert c.get("/v1/nothing").status_code == 404
        _still_serving(server)

    def test_openai_sdk_sees_errors_as_its_own_exceptions(self, server: ServerProcess) -> None:
        """The SDK raises BadRequestError for a 400, with the server's message."""
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="user message"):
            client.chat.completions.create(model="rlm", messages=[{"role": "system", "content": "x"}])

    def test_a_context_file_that_cannot_be_used_is_the_clients_error(self, server: ServerProcess) -> None:
        """A chat completion naming a file that does not exist is a 404, and one that is not
        UTF-8 a 400, each with the file named (they were 500s: the file is read once the
        query holds a slot, and its failure ended the query as a server error). Streamed,
        the same error comes as the stream's error event. The SDK raises its own exceptions."""
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        with pytest.raises(openai.NotFoundError, match="no file 'file-0123456789abcdef'"):
            client.chat.completions.create(
                model="rlm",
                messages=[{"role": "user", "content": "how many?"}],
                extra_body={"rlm": {"file_id": "file-0123456789abcdef"}},
            )
        with _client(server) as c:
            binary = c.post(
                "/v1/files", content=bytes(range(256)) * 8, headers={"content-type": "text/plain"}
            )
            file_id = binary.json()["id"]
            ask = {
                "model": "rlm",
                "messages": [{"role": "user", "content": "q"}],
                "rlm": {"file_id": file_id},
            }
            r = c.post("/v1/chat/completions", json=ask)
            assert r.status_code == 400 and _error(r) == {
                "message": f"file {file_id} is not UTF-8 text",
                "type": "invalid_request_error",
                "param": "file_id",
                "code": None,
            }
            r = c.post(
                "/v1/chat/completions", json={**ask, "stream": True, "rlm": {"file_id": "../etc/passwd"}}
            )
            assert r.status_code == 200  # a stream has begun before the query runs
            events = [json.loads(e["data"]) for e in _sse(r.text) if e.get("data")]
            assert events[-1] == {
                "error": {
                    "message": "no file '../etc/passwd'",
                    "type": "invalid_request_error",
                    "param": "file_id",
                    "code": "not_found",
                }
            }
        _still_serving(server)

    def test_body_over_the_limit_is_413(self) -> None:
        """A chat body over max_body_bytes is a 413 that points at /v1/files; a file over
        max_file_bytes is a 413 too (by Content-Length, and while streaming without one)."""
        with (
            ServerProcess(config_text(serve="max_body_bytes = 10000\nmax_file_bytes = 20000")) as s,
            _client(s) as c,
        ):
            big = {"model": "rlm", "messages": [{"role": "user", "content": "x" * 20000}]}
            r = c.post("/v1/chat/completions", json=big)
            assert r.status_code == 413 and "/v1/files" in _error(r)["message"]
            r = c.post("/v1/files", content=b"y" * 30000)
            assert r.status_code == 413

            def chunks() -> Iterator[bytes]:
                for _ in range(10):
                    yield b"z" * 4000

            r = c.post("/v1/files", content=chunks())  # chunked: no Content-Length
            assert r.status_code == 413
            assert os.listdir(s.config_path.parent)  # the server is alive
            _still_serving(s)

    def test_unknown_model_with_several_profiles_is_404(self) -> None:
        """With two profiles, the model must name one: /v1/models lists both, another name is
        a 404 model_not_found."""
        tmp = tempfile.mkdtemp()
        with open(os.path.join(tmp, "deep.toml"), "w") as f:
            f.write(config_text().replace("max_depth = 1", "max_depth = 2"))
        serve = f'name = "rlm"\n[serve.profiles]\ndeep = "{tmp}/deep.toml"\n'
        with ServerProcess(config_text(serve=serve)) as s, _client(s) as c:
            assert sorted(m["id"] for m in c.get("/v1/models").json()["data"]) == ["deep", "rlm"]
            r = c.post(
                "/v1/chat/completions",
                json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]},
            )
            assert r.status_code == 404 and _error(r)["code"] == "model_not_found"
            r = c.post(
                "/v1/chat/completions",
                json={"model": "deep", "messages": [{"role": "user", "content": "x y"}]},
            )
            assert r.status_code == 200


# ============================================================================ auth and tenants


KEYS = "alice:alice-key-0123456789abcdef,bob:bob-key-0123456789abcdefgh"


class TestAuth:
    def test_keys_are_required_and_tenants_are_apart(self) -> None:
        """With keys set: no key or a wrong key is a 401 (the key never echoed or logged);
        a tenant cannot see another tenant's job or file; healthz needs no key."""
        with ServerProcess(config_text(), env={"RLM_SERVE_KEYS": KEYS}) as s:
            assert "2 bearer key(s)" in s.banner
            with httpx.Client(base_url=s.root_url, timeout=60) as c:
                assert c.get("/healthz").status_code == 200
                r = c.get("/v1/models")
                assert r.status_code == 401 and _error(r)["type"] == "authentication_error"
                r = c.get("/v1/models", headers={"authorization": "Bearer alice-key-0123456789abcdeX"})
                assert r.status_code == 401 and "alice-key" not in r.text
                alice = {"authorization": "Bearer alice-key-0123456789abcdef"}
                bob = {"authorization": "Bearer bob-key-0123456789abcdefgh"}
                job = c.post(
                    "/v1/rlm/jobs", headers=alice, json={"model": "rlm", "context": "a", "query": "b"}
                ).json()
                _wait = time.monotonic() + 30
                while c.get(f"/v1/rlm/jobs/{job['id']}", headers=alice).json()["state"] not in ("completed",):
                    assert time.monotonic() < _wait
                    time.sleep(0.05)
                assert c.get(f"/v1/rlm/jobs/{job['id']}", headers=bob).status_code == 404
            client = openai.OpenAI(base_url=s.base_url, api_key="wrong-key-0123456789abcdef", max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                client.models.list()
            assert "alice-key" not in s.log() and "wrong-key" not in s.log()

    def test_no_keys_refuses_a_public_bind(self) -> None:
        """Without keys the server binds loopback only: another host is refused at start."""
        tmp = tempfile.mkdtemp()
        path = os.path.join(tmp, "c.toml")
        with open(path, "w") as f:
            f.write(config_text())
        env = {k: v for k, v in os.environ.items() if k != "RLM_SERVE_KEYS"}
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "rlm_async.cli",
                "serve",
                "--config",
                path,
                "--host",
                "0.0.0.0",
                "--port",
                "0",
            ],
            capture_output=True,
            env=env,
            timeout=60,
        )
        assert out.returncode == 2 and b"loopback only" in out.stderr

    def test_tenant_budget_and_rate_limit(self) -> None:
        """A key's budget, once spent, refuses new queries with 429 insufficient_quota; its
        request rate beyond the limit gets 429 with retry-after."""
        serve = "[serve.tenant_limits]\nmax_usd = 0.001\nrequests_per_minute = 3\n"
        with ServerProcess(config_text(serve=serve), env={"RLM_SERVE_KEYS": KEYS}) as s, _client(s) as c:
            alice = {"authorization": "Bearer alice-key-0123456789abcdef"}
            bob = {"authorization": "Bearer bob-key-0123456789abcdefgh"}
            body = {
                "model": "rlm",
                "messages": [{"role": "user", "content": CONTEXT}, {"role": "user", "content": "?"}],
            }
            first = c.post("/v1/chat/completions", headers=alice, json=body)
            assert first.status_code == 200
            assert first.json()["rlm"]["status"] == "budget_exceeded"  # refused before crossing $0.001
            assert first.json()["rlm"]["limit_hit"] == "tenant.usd"
            r = c.post("/v1/chat/completions", headers=alice, json=body)
            assert r.status_code == 429 and _error(r)["code"] == "insufficient_quota"
            small = {"model": "rlm", "messages": [{"role": "user", "content": "x"}]}
            responses = [c.post("/v1/chat/completions", headers=bob, json=small) for _ in range(4)]
            assert [r.status_code for r in responses] == [200, 429, 429, 429]  # bob's budget is as small
            assert [_error(r)["code"] for r in responses[1:3]] == ["insufficient_quota"] * 2
            assert _error(responses[3])["code"] == "rate_limit_exceeded"  # 3 a minute
            assert int(responses[3].headers["retry-after"]) >= 1


# ============================================================================ admission, disconnects, shutdown


def until_fanout(lines: Iterator[str]) -> None:
    """Read a streamed query's progress until its worker is up (it starts beside the first
    root call, so either may come first) and its first root turn is done: from then on,
    with a slow sub model, its fan-out is in flight."""
    waiting = {"worker.start", "call.finish"}
    for line in lines:
        waiting -= {kind for kind in waiting if kind in line}
        if not waiting:
            return
    raise AssertionError(f"the stream ended before {sorted(waiting)}")


class TestAdmission:
    def test_flood_beyond_the_queue_gets_429_then_recovers(self) -> None:
        """With 2 running and 2 queued, 12 at once: 4 are served, 8 get 429 with retry-after
        and OpenAI's error body; when the flood is over, a new request is served."""
        serve = "max_running = 2\nmax_queued = 2\n"
        with ServerProcess(config_text(serve=serve, sub_ttft=1.0)) as s:
            body = {
                "model": "rlm",
                "messages": [{"role": "user", "content": CONTEXT}, {"role": "user", "content": "?"}],
            }

            def one(_: int) -> httpx.Response:
                with httpx.Client(base_url=s.root_url, timeout=120) as c:
                    return c.post("/v1/chat/completions", json=body)

            with concurrent.futures.ThreadPoolExecutor(12) as pool:
                responses = list(pool.map(one, range(12)))
            codes = sorted(r.status_code for r in responses)
            assert codes == [200] * 4 + [429] * 8, codes
            refused = [r for r in responses if r.status_code == 429]
            assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
            assert all(_error(r)["type"] == "rate_limit_error" for r in refused)
            with _client(s) as c:
                assert "rlm_http_429_sent_total 8" in c.get("/metrics").text
            _still_serving(s)

    def test_client_disconnecting_mid_stream_cancels_its_query(self) -> None:
        """A streaming client that goes away mid-query: its query is cancelled, its REPL
        worker killed (the server has no child process left), and the server keeps serving."""
        with ServerProcess(config_text(sub_ttft=5.0)) as s:
            body = {
                "model": "rlm",
                "stream": True,
                "messages": [{"role": "user", "content": CONTEXT}, {"role": "user", "content": "?"}],
            }
            with (
                httpx.Client(base_url=s.root_url, timeout=60) as c,
                c.stream("POST", "/v1/chat/completions", json=body) as r,
            ):
                # Held, not dropped at `break`: a dropped line iterator is finalised (at once,
                # or by the collector later) and closing it closes the connection, which
                # cancels the query before the checks below.
                lines = r.iter_lines()
                until_fanout(lines)
                assert s.children(), "the query's worker should be running"
                uids = s.worker_uids()
                assert uids or os.geteuid() != 0  # as root, workers run as private uids
            # the connection is closed here, mid-stream
            assert s.wait_no_children() == []
            assert s.running_as(uids) == []  # nor anywhere else on the host: no orphan
            with _client(s) as c:
                deadline = time.monotonic() + 10
                while 'rlm_queries_total{status="cancelled"' not in c.get("/metrics").text:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            _still_serving(s)

    def test_non_streaming_client_disconnect_cancels_too(self) -> None:
        """A plain request whose client times out and closes: the query is cancelled."""
        with ServerProcess(config_text(sub_ttft=5.0)) as s:
            body = {
                "model": "rlm",
                "messages": [{"role": "user", "content": CONTEXT}, {"role": "user", "content": "?"}],
            }
            with httpx.Client(base_url=s.root_url, timeout=1.5) as c, pytest.raises(httpx.ReadTimeout):
                c.post("/v1/chat/completions", json=body)
            assert s.wait_no_children() == []


class TestShutdown:
    def test_sigterm_drains_then_cancels(self) -> None:
        """SIGTERM: new connections are refused at once; a query that fits in the grace
        period finishes and its record is written; one that does not is cancelled, its
        worker killed; the process exits 0 with no child left."""
        data = tempfile.mkdtemp(prefix="rlm-serve-data-")
        serve = "grace_s = 3\n"
        quick_cfg = config_text(serve=serve, sub_ttft=0.5)
        s = ServerProcess(quick_cfg, data_dir=data).start()
        try:
            with _client(s) as c:
                quick = c.post("/v1/rlm/jobs", json={"model": "rlm", "context": CONTEXT, "query": "?"}).json()
                time.sleep(0.3)
                assert s.terminate() == 0
            with pytest.raises(httpx.ConnectError), _client(s) as c:
                c.get("/healthz")
            assert s.children() == []
        finally:
            s.stop()
        slow_cfg = config_text(serve=serve, sub_ttft=30.0)
        with ServerProcess(slow_cfg, data_dir=data) as s2, _client(s2) as c:
            assert c.get(f"/v1/rlm/jobs/{quick['id']}").json()["state"] == "completed"
            slow = c.post("/v1/rlm/jobs", json={"model": "rlm", "context": CONTEXT, "query": "?"}).json()
            deadline = time.monotonic() + 30
            while not s2.children() and time.monotonic() < deadline:
                time.sleep(0.05)
            started = time.monotonic()
            assert s2.terminate() == 0
            assert time.monotonic() - started < 20  # grace 3 s, then cancelled: not 30 s of latency
            assert s2.children() == []
        with ServerProcess(slow_cfg, data_dir=data) as s3, _client(s3) as c:
            record = c.get(f"/v1/rlm/jobs/{slow['id']}").json()
            assert record["state"] == "cancelled" and "shut down" in record["detail"]
        shutil.rmtree(data, ignore_errors=True)

    def test_sigterm_flushes_the_journal(self) -> None:
        """A server with a response journal answers a query, then gets SIGTERM: a new
        server on the same journal answers the same query from it, every model call a
        journal hit (nothing sent again, nothing paid twice)."""
        data = tempfile.mkdtemp(prefix="rlm-serve-journal-")
        journal = f"{data}/journal.sqlite"
        cfg = config_text().replace("[rlm]\n", f'[rlm]\njournal_path = "{journal}"\n', 1)
        body = {
            "model": "rlm",
            "stream": True,
            "rlm": {"progress": "events"},
            "messages": [{"role": "user", "content": CONTEXT}, {"role": "user", "content": "Which orders?"}],
        }

        def calls(text: str) -> list[dict[str, Any]]:
            records = [
                json.loads(line[len("data: ") :]) for line in text.splitlines() if '"call.finish"' in line
            ]
            assert records, text[:2000]
            return records

        s = ServerProcess(cfg).start()
        try:
            with _client(s) as c:
                first = calls(c.post("/v1/chat/completions", json=body).text)
            assert s.terminate() == 0
        finally:
            s.stop()
        assert not any(r["from_journal"] for r in first)
        with ServerProcess(cfg) as s2, _client(s2) as c:
            again = calls(c.post("/v1/chat/completions", json=body).text)
        assert len(again) == len(first) and all(r["from_journal"] for r in again), again
        shutil.rmtree(data, ignore_errors=True)


class TestOperations:
    def test_metrics_and_healthz(self, server: ServerProcess) -> None:
        """/metrics is Prometheus text with queries by status, sub-calls, tokens, dollars,
        in flight, queue depth, 429s both ways, the sandbox tier, the event loop's lag and the
        garbage collector's collections."""
        with _client(server) as c:
            c.post(
                "/v1/chat/completions",
                json={"model": "rlm", "messages": [{"role": "user", "content": "a b"}]},
            )
            text = c.get("/metrics").text
            health = c.get("/healthz").json()
        assert health["status"] == "ok" and health["profiles"] == ["rlm"]
        for name in (
            "rlm_queries_total",
            "rlm_subcalls_total",
            "rlm_tokens_total",
            "rlm_cost_usd_total",
            "rlm_queries_in_flight",
            "rlm_queue_depth",
            "rlm_http_429_sent_total",
            "rlm_upstream_429_total",
            "rlm_sandbox_workers_total",
        ):
            assert f"# TYPE {name} " in text, name
        assert 'rlm_queries_total{status="ok",tenant="local"}' in text
        assert 'rlm_sandbox_workers_total{tier="' in text
        # The lag probe has been waking every 50 ms since the server started: its histogram
        # counts every wake-up in +Inf.
        assert "# TYPE rlm_event_loop_lag_seconds histogram" in text
        samples = dict(
            line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("rlm_event_loop_lag")
        )
        count = int(samples["rlm_event_loop_lag_seconds_count"])
        assert count > 0 and int(samples['rlm_event_loop_lag_seconds_bucket{le="+Inf"}']) == count, samples
        # The collector's counters, by generation; a query's objects made the young one run.
        assert 'rlm_gc_seconds_total{generation="2"} ' in text
        young = next(
            line for line in text.splitlines() if line.startswith('rlm_gc_collections_total{generation="0"}')
        )
        assert int(young.split()[-1]) > 0, young

    def test_each_query_is_traced_under_the_id_its_answer_names(self) -> None:
        """With `[serve] trace_dir`, a chat completion's `rlm.query_id` and a job's
        `query_id` name their JSONL traces, which hold the whole query (what
        `rlm-async trace view` opens)."""
        traces = Path(tempfile.mkdtemp(prefix="rlm-serve-traces-"))
        with ServerProcess(config_text(serve=f'trace_dir = "{traces}"\n')) as s, _client(s) as c:
            chat = c.post(
                "/v1/chat/completions",
                json={
                    "model": "rlm",
                    "messages": [{"role": "user", "content": CONTEXT}, {"role": "user", "content": "?"}],
                },
            ).json()
            job = c.post(
                "/v1/rlm/jobs", json={"model": "rlm", "context": "a b c", "query": "What is this?"}
            ).json()
            record = _wait_job(c, job["id"], 60)
        ids = [chat["rlm"]["query_id"], record["query_id"]]
        assert ids[0] and ids[1] and ids[0] != ids[1]
        for query_id in ids:
            trace = load_trace(traces / f"{query_id}.jsonl")
            kinds = [e.kind for e in trace.events]
            assert kinds[0] == "query.start" and kinds[-1] == "query.finish", kinds
            assert "call.finish" in kinds and "worker.start" in kinds
        shutil.rmtree(traces, ignore_errors=True)

    def test_opentelemetry_spans_over_http(self) -> None:
        """A live `rlm-async serve --otel` whose process exports to the OTel SDK's in-memory
        exporter: two queries from the openai SDK over loopback (plain and streamed) are two
        traces, each one `invoke_agent` root named by the answer's `rlm.query_id`, with an
        `execute_tool` span per REPL cell under it, a child RLM's `invoke_agent` under the
        cell that started it, and one `chat` span per model call the answer's usage counts."""
        spans_path = Path(tempfile.mkdtemp(prefix="rlm-otel-")) / "spans.jsonl"
        config = (
            config_text(chunks=2, serve="otel = true\n")
            .replace("max_depth = 1", "max_depth = 2")
            .replace("chunks = 2\n", 'chunks = 2\nfanout = "rlm_query_batched"\n')
        )
        server = ServerProcess(
            config,
            env={"RLM_TEST_SPANS": str(spans_path)},
            program=[sys.executable, str(Path(__file__).with_name("_otel_serve.py"))],
        )
        with server as s:
            client = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0)
            messages: list[ChatCompletionMessageParam] = [
                {"role": "user", "content": CONTEXT},
                {"role": "user", "content": "How many lines mention an invoice?"},
            ]
            plain = client.chat.completions.create(model="rlm", messages=messages)
            streamed = list(
                client.chat.completions.create(
                    model="rlm", messages=messages, stream=True, stream_options={"include_usage": True}
                )
            )
            assert s.terminate() == 0
        query_id = (plain.model_extra or {})["rlm"]["query_id"]
        assert query_id
        spans = [json.loads(line) for line in spans_path.read_text().splitlines()]
        shutil.rmtree(spans_path.parent, ignore_errors=True)
        by_id = {sp["span_id"]: sp for sp in spans}
        roots = [sp for sp in spans if sp["parent_id"] is None]
        assert len(roots) == 2 and all(r["name"] == "invoke_agent rlm" for r in roots), roots
        assert {r["trace_id"] for r in roots} == {sp["trace_id"] for sp in spans}  # nothing orphaned
        assert len({r["trace_id"] for r in roots}) == 2
        mine = next(r for r in roots if r["attributes"]["rlm.query_id"] == query_id)
        in_trace = [sp for sp in spans if sp["trace_id"] == mine["trace_id"]]
        op = {sp["span_id"]: sp["attributes"]["gen_ai.operation.name"] for sp in spans}
        chats = [sp for sp in in_trace if op[sp["span_id"]] == "chat"]
        tools = [sp for sp in in_trace if op[sp["span_id"]] == "execute_tool"]
        children = [sp for sp in in_trace if op[sp["span_id"]] == "invoke_agent" and sp["parent_id"]]
        assert plain.usage is not None and plain.usage.model_extra is not None
        assert len(chats) == plain.usage.model_extra["rlm_calls"]
        assert all(sp["kind"] == "CLIENT" and sp["name"].startswith("chat sim-") for sp in chats)
        assert all(sp["attributes"]["gen_ai.usage.input_tokens"] > 0 for sp in chats)
        assert tools and all(by_id[t["parent_id"]]["name"] == "invoke_agent rlm" for t in tools)
        assert len(children) == 2  # two chunks, a child RLM each, under the cell that ran them
        assert all(op[c["parent_id"]] == "execute_tool" for c in children)
        assert all(c["attributes"]["rlm.depth"] == 1 for c in children)
        child_ids = {c["span_id"] for c in children}
        assert any(sp["parent_id"] in child_ids for sp in chats)  # a child's calls nest under it
        assert mine["status"] != "ERROR" and all(c["status"] != "ERROR" for c in chats)
        # A cell whose code failed (shown to the model, not raised) is an error span that says why.
        assert all("error.type" in t["attributes"] for t in tools if t["status"] == "ERROR")
        usage = streamed[-1].usage
        assert usage is not None and usage.total_tokens > 0

    def test_upstream_429s_are_counted_and_retried(self) -> None:
        """The model server answers the first two requests with 429: the query still
        answers (the governor retried after their retry-after), /metrics counts the two
        429s received, and none sent."""
        faults = '\n[sim.faults]\nscript = ["error_429", "error_429"]\nretry_after_s = 0.05\n'
        with ServerProcess(config_text() + faults) as s, _client(s) as c:
            r = c.post(
                "/v1/chat/completions",
                json={
                    "model": "rlm",
                    "messages": [{"role": "user", "content": CONTEXT}, {"role": "user", "content": "?"}],
                },
            )
            assert r.status_code == 200, r.text
            assert r.json()["rlm"]["status"] == "ok"
            text = c.get("/metrics").text
        assert "rlm_upstream_429_total 2" in text, text
        assert "rlm_http_429_sent_total 0" in text


class TestWorkerPool:
    def test_the_server_hands_out_prestarted_workers_once_and_leaves_none(self) -> None:
        """With [serve] worker_pool = 2: two workers wait before any query; two queries
        take them (the metrics count 2 pooled workers), after which those two processes
        are gone and the pool holds two new ones; SIGTERM leaves no child process."""
        with ServerProcess(config_text(pool=2)) as s, _client(s) as c:

            def idle() -> float:
                for line in c.get("/metrics").text.splitlines():
                    if line.startswith("rlm_worker_pool_idle "):
                        return float(line.split()[-1])
                raise AssertionError("no rlm_worker_pool_idle gauge")

            def wait_idle(n: int) -> None:
                deadline = time.monotonic() + 60
                while idle() < n:
                    assert time.monotonic() < deadline, "the pool did not fill"
                    time.sleep(0.05)

            wait_idle(2)
            first = set(s.children())
            assert first, "the pool's workers are the server's children"
            body = {
                "model": "rlm",
                "messages": [{"role": "user", "content": CONTEXT}, {"role": "user", "content": "?"}],
            }
            with concurrent.futures.ThreadPoolExecutor(2) as ex:
                replies = list(ex.map(lambda _: c.post("/v1/chat/completions", json=body), range(2)))
            assert [r.status_code for r in replies] == [200, 200]
            text = c.get("/metrics").text
            assert "rlm_sandbox_workers_pooled_total 2" in text
            wait_idle(2)
            now = set(s.children())
            assert now and not now & first  # the pre-started ones were used once, then killed
            assert s.terminate() == 0
            assert s.children() == []

    def test_a_client_disconnecting_kills_its_pooled_worker(self) -> None:
        """With the pool on, a streaming client that goes away mid-query: its query is
        cancelled and the pooled worker it took is killed, so the server's child processes
        are then those of the pool's idle workers alone (no orphan), and it keeps serving."""
        with ServerProcess(config_text(sub_ttft=5.0, pool=2)) as s, _client(s) as c:

            def idle() -> list[str]:
                return [
                    ln for ln in c.get("/metrics").text.splitlines() if ln.startswith("rlm_worker_pool_idle ")
                ]

            deadline = time.monotonic() + 60
            while idle() != ["rlm_worker_pool_idle 2"]:
                assert time.monotonic() < deadline, "the pool did not fill"
                time.sleep(0.05)
            prestarted = set(s.children())  # every process of the two idle workers
            idle_uids = s.worker_uids()
            body = {
                "model": "rlm",
                "stream": True,
                "messages": [{"role": "user", "content": CONTEXT}, {"role": "user", "content": "?"}],
            }
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()  # held: dropping it would disconnect before the uids are read
                until_fanout(lines)  # in a pooled worker
                taken_uids = s.worker_uids() - idle_uids  # it switched to its uid with its context
                assert taken_uids or os.geteuid() != 0
            deadline = time.monotonic() + 30
            while 'rlm_queries_total{status="cancelled"' not in c.get("/metrics").text:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            deadline = time.monotonic() + 30
            while True:  # the refill replaces the taken worker; nothing else may remain
                left = set(s.children())
                if len(left) == len(prestarted) and idle() == ["rlm_worker_pool_idle 2"]:
                    break
                assert time.monotonic() < deadline, (prestarted, left, idle())
                time.sleep(0.05)
            gone = prestarted - left
            assert gone and len(gone) == len(prestarted) // 2  # the taken worker, all of it
            assert s.running_as(taken_uids) == []  # nothing of it anywhere on the host
            assert "rlm_sandbox_workers_pooled_total 1" in c.get("/metrics").text
            _still_serving(s)
