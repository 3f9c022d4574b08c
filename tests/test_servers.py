"""Knowing the server: identification from probe answers, the defaults that follow, the
context-window fit, and the vLLM-like fan-out the issue measured (0 of 100 hits before).

The unit tests feed `identify` the answers real servers give (shapes from their sources
and, for llama-cpp-python, from the real server in `test_real_model.py`); the end-to-end
tests run the simulator playing vLLM: its `/v1/models` says "vllm" with `max_model_len`, its
cache follows vLLM's block rules (16-token blocks, usable once the writer finished) and it
serves `/tokenize`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import anyio
import pytest
from conftest import EventLog, model, sandbox_config

from rlm_async._cache import CacheSettings
from rlm_async._config import ModelConfig, RLMConfig
from rlm_async._events import CallFinish, ServerDetected, WarmupDecision
from rlm_async._governor import EndpointLimits, Governor, ModelPrice
from rlm_async._result import RLMResult
from rlm_async._rlm import RLM
from rlm_async._servers import (
    Fitted,
    ServerProfile,
    count_prompt_tokens,
    detect,
    fit,
    identify,
    resolve,
    window_from_error,
)
from rlm_async._types import Completion, Message, ModelRequest
from rlm_async.exceptions import ConfigError, ContextLengthExceeded
from rlm_async.sim import (
    CacheModel,
    KindLatency,
    LatencyModel,
    LogEntry,
    Persona,
    Policies,
    PolicySpec,
    SimConfig,
    SimProcess,
    SimServer,
    prompt_tokens,
)
from rlm_async.transport import OpenAITransport, ProbeResponse, Transport
from rlm_async.workloads import oolong_counting

pytestmark = pytest.mark.anyio

EP = "http://127.0.0.1:8000/v1"


def ok(body: Any) -> ProbeResponse:
    return ProbeResponse(200, body)


def models(*cards: Mapping[str, Any]) -> ProbeResponse:
    return ok({"object": "list", "data": list(cards)})


class FakeServer(Transport):
    """Answers probes from a table of (method, path) -> response; counts them."""

    def __init__(self, answers: Mapping[tuple[str, str], ProbeResponse], endpoint: str = EP) -> None:
        self.endpoint = endpoint
        self.answers = answers
        self.probed: list[tuple[str, str, Any]] = []

    async def complete(self, request: ModelRequest) -> Completion:
        raise AssertionError("not used")

    async def probe(
        self, method: str, url: str, body: Mapping[str, Any] | None = None, *, timeout_s: float = 5.0
    ) -> ProbeResponse | None:
        path = url.removeprefix("http://127.0.0.1:8000")
        self.probed.append((method, path, body))
        return self.answers.get((method, path))


# ============================================================================ identify


class TestIdentify:
    def test_vllm_is_its_owner_and_its_max_model_len(self) -> None:
        """vLLM's cards say owned_by "vllm" and carry max_model_len: two signs agree, the
        window is read per model, and `/tokenize` is its tokenizer."""
        p = identify(EP, models({"id": "m", "owned_by": "vllm", "max_model_len": 32768}), {})
        assert (p.kind, p.window_for("m"), p.tokenizer) == ("vllm", 32768, "vllm")
        assert any("owned_by 'vllm'" in e for e in p.evidence)

    def test_owned_by_alone_is_not_proof(self) -> None:
        """A card that says "vllm" without vLLM's max_model_len is not taken at its word."""
        p = identify(EP, models({"id": "m", "owned_by": "vllm"}), {})
        assert p.kind == "unknown" and "not confirmed" in p.evidence[-1]

    def test_llama_cpp_python_needs_its_openapi_title(self) -> None:
        """llama-cpp-python says owned_by "me", which anyone could; its OpenAPI title makes
        it certain, and it is known to serve one request at a time."""
        cards = models({"id": "gemma", "object": "model", "owned_by": "me", "permissions": []})
        title = {"/openapi.json": ok({"info": {"title": "🦙 llama.cpp Python API", "version": "0.3.36"}})}
        p = identify(EP, cards, title)
        assert (p.kind, p.tokenizer, p.parallel, p.window) == (
            "llama-cpp-python",
            "llama-cpp-python",
            1,
            None,
        )
        assert identify(EP, cards, {"/openapi.json": ok({"info": {"title": "Other"}})}).kind == "unknown"
        assert identify(EP, cards, {"/openapi.json": None}).kind == "unknown"

    def test_llama_cpp_server_reports_n_ctx_and_slots_in_props(self) -> None:
        """llama.cpp's `llama-server`: owned_by "llamacpp" and `/props` with n_ctx."""
        props = ok({"default_generation_settings": {"n_ctx": 4096}, "total_slots": 4})
        p = identify(EP, models({"id": "x", "owned_by": "llamacpp"}), {"/props": props})
        assert (p.kind, p.window_for("x"), p.parallel, p.tokenizer) == ("llamacpp", 4096, 4, "llamacpp")

    def test_sglang_and_ollama(self) -> None:
        """SGLang by owner and max_model_len (or `/get_model_info`); Ollama by owner and
        `/api/version`."""
        sg = identify(EP, models({"id": "q", "owned_by": "sglang", "max_model_len": 8192}), {})
        assert (sg.kind, sg.window_for("q")) == ("sglang", 8192)
        info = {"/get_model_info": ok({"model_path": "Qwen/Qwen3-8B"})}
        assert identify(EP, models({"id": "q", "owned_by": "sglang"}), info).kind == "sglang"
        ol = identify(
            EP, models({"id": "l", "owned_by": "library"}), {"/api/version": ok({"version": "0.9"})}
        )
        assert ol.kind == "ollama"

    def test_openai_by_host_and_unknowns(self) -> None:
        """api.openai.com is OpenAI without a probe; no model list is "unknown"."""
        assert identify("https://api.openai.com/v1", None, {}).kind == "openai"
        assert identify(EP, None, {}).kind == "unknown"
        assert identify(EP, ProbeResponse(404, None), {}).kind == "unknown"


class TestDetect:
    async def test_at_most_two_gets(self) -> None:
        """Detection asks `/v1/models`, then only the one path that confirms its owner."""
        fake = FakeServer(
            {
                ("GET", "/v1/models"): models({"id": "g", "owned_by": "me"}),
                ("GET", "/openapi.json"): ok({"info": {"title": "🦙 llama.cpp Python API"}}),
            }
        )
        assert (await detect(fake)).kind == "llama-cpp-python"
        assert [(m, p) for m, p, _ in fake.probed] == [("GET", "/v1/models"), ("GET", "/openapi.json")]

    async def test_a_transport_that_cannot_probe_is_unknown(self) -> None:
        """The test doubles (and custom wires) do not probe: detection says so, no error."""
        fake = FakeServer({}, endpoint="scripted://")
        p = await detect(fake)
        assert p.kind == "unknown" and p.evidence == ("the transport cannot probe",)

    async def test_probes_stay_on_the_endpoints_origin(self) -> None:
        """The transport's key goes only where it was meant to: a probe elsewhere is a bug."""
        transport = OpenAITransport(EP, api_key="sk-test")
        try:
            with pytest.raises(ValueError, match="origin"):
                await transport.probe("GET", "http://127.0.0.2:8000/v1/models")
        finally:
            await transport.aclose()

    async def test_an_unreachable_server_is_unknown(self) -> None:
        """Nothing listening: "unknown", quickly, and no exception."""
        transport = OpenAITransport("http://127.0.0.1:9/v1", api_key_env=None)
        try:
            p = await detect(transport, timeout_s=2.0)
        finally:
            await transport.aclose()
        assert p.kind == "unknown" and "no answer" in p.evidence[0]


# ============================================================================ defaults


def vllm_profile(window: int = 4096) -> ServerProfile:
    return identify(EP, models({"id": "m", "owned_by": "vllm", "max_model_len": window}), {})


class TestResolve:
    def test_detected_defaults_fill_what_the_config_leaves_out(self) -> None:
        """No cache, window or limits configured: vLLM's cache settings (16-token blocks,
        warmed when it pays) and its window are used, and each says it was detected."""
        s = resolve(model("m", EP), vllm_profile())
        assert s.cache == CacheSettings.vllm() and s.cache.min_cacheable_tokens == 16
        assert (s.cache_source, s.context_window, s.window_source) == ("detected", 4096, "detected")
        assert s.count_tokens and s.limits_source == "default"

    def test_explicit_configuration_always_wins(self) -> None:
        """Cache settings, a window and limits given in the config are kept as given."""
        mine = CacheSettings(warm=False)
        limits = EndpointLimits(max_concurrency=3)
        s = resolve(model("m", EP, cache=mine, context_window=2048, limits=limits), vllm_profile())
        assert (s.cache, s.cache_source) == (mine, "configured")
        assert (s.context_window, s.window_source) == (2048, "configured")
        assert (s.limits, s.limits_source) == (limits, "configured")

    def test_an_unknown_server_keeps_todays_defaults(self) -> None:
        """Detection found nothing: OpenAI-like cache defaults, no window, no counting."""
        s = resolve(model("m", EP), ServerProfile(endpoint=EP))
        assert (s.cache, s.cache_source) == (CacheSettings(), "default")
        assert (s.context_window, s.count_tokens, s.limits) == (None, False, EndpointLimits())

    def test_one_request_at_a_time_becomes_the_concurrency(self) -> None:
        """llama-cpp-python serves one request at a time: queue here, not at the server."""
        p = ServerProfile(endpoint=EP, kind="llama-cpp-python", tokenizer="llama-cpp-python", parallel=1)
        s = resolve(model("g", EP), p)
        assert (s.limits.max_concurrency, s.limits_source) == (1, "detected")
        assert s.cache.warm is False

    def test_a_named_server_skips_identification(self) -> None:
        """`server = "vllm"` makes an unidentified server vLLM; "off" ignores what was found."""
        named = resolve(model("m", EP, server="vllm"), ServerProfile(endpoint=EP))
        assert (named.profile.kind, named.cache, named.count_tokens) == ("vllm", CacheSettings.vllm(), True)
        off = resolve(model("m", EP, server="off"), vllm_profile())
        assert (off.profile.kind, off.context_window, off.cache_source) == ("unknown", None, "default")

    def test_a_bad_server_name_is_a_config_error(self) -> None:
        """A typo in `server` names the valid choices."""
        with pytest.raises(ConfigError, match="llama-cpp-python"):
            ModelConfig(model="m", server="vlm")

    def test_the_decision_reads_as_lines(self) -> None:
        """`doctor` prints one line per setting, each with its source."""
        text = "\n".join(resolve(model("m", EP), vllm_profile()).lines())
        assert "server:          vllm" in text and "[detected]" in text and "4,096 tokens" in text


class TestWindowFromError:
    @pytest.mark.parametrize(
        ("message", "window"),
        [
            ("This model's maximum context length is 4096 tokens. However, you requested 8625", 4096),
            ("Requested tokens (8625) exceed context window of 4096", 4096),
            ("bad request", None),
        ],
    )
    def test_reads_the_window_servers_name(self, message: str, window: int | None) -> None:
        """vLLM/OpenAI and llama-cpp-python name the window in their error text."""
        assert window_from_error(message) == window


# ============================================================================ fit


def request(chunk_chars: int, max_tokens: int | None = 4096) -> ModelRequest:
    return ModelRequest(
        model="m",
        messages=(Message("system", "Read the chunk."), Message("user", "x" * chunk_chars)),
        max_tokens=max_tokens,
    )


RATE = Governor().rate_estimator
"""The engine's fair guess of a prompt's tokens (4 characters a token, plus allowances)."""


def counting_server(count: int) -> FakeServer:
    return FakeServer({("POST", "/tokenize"): ok({"count": count, "max_model_len": 4096})})


async def _fit(request: ModelRequest, *args: Any, **kwargs: Any) -> Fitted:
    """`fit` with the guess the engine passes: the governor's rate estimate."""
    return await fit(request, *args, guess=RATE.prompt_tokens(request), **kwargs)


class TestFit:
    async def test_a_prompt_that_cannot_fit_is_refused_before_sending(self) -> None:
        """A 4,500-token prompt against a 4,096-token window is refused with a message that
        names the chunk's size and the window; nothing but the count was asked."""
        fake = counting_server(4500)
        settings = resolve(model("m", EP), vllm_profile())
        with pytest.raises(ContextLengthExceeded, match=r"18,000 characters.*4,096 tokens"):
            await _fit(
                request(18_000), settings, fake, bound=18_100, default_max_tokens=8192, count_for_budget=False
            )
        assert [p for _, p, _ in fake.probed] == ["/tokenize"]

    async def test_max_tokens_is_cut_to_what_still_fits(self) -> None:
        """A 1,000-token prompt with max_tokens 4,096 in a 4,096 window asks for 3,096."""
        settings = resolve(model("m", EP), vllm_profile())
        fitted = await _fit(
            request(4000),
            settings,
            counting_server(1000),
            bound=4100,
            default_max_tokens=8192,
            count_for_budget=False,
        )
        assert (fitted.request.max_tokens, fitted.prompt_tokens) == (3096, 1000)

    async def test_nothing_is_counted_when_the_bound_fits(self) -> None:
        """Byte bound + max_tokens inside the window: no tokenize request, nothing changed."""
        fake = counting_server(10)
        settings = resolve(model("m", EP), vllm_profile(window=100_000))
        fitted = await _fit(
            request(100), settings, fake, bound=200, default_max_tokens=8192, count_for_budget=False
        )
        assert fitted.request == request(100) and fitted.prompt_tokens is None and not fake.probed

    async def test_a_budget_cap_asks_for_the_exact_count(self) -> None:
        """With a budget cap the prompt is counted even when it fits, so the reservation is
        the server's count, not the byte bound."""
        settings = resolve(model("m", EP), vllm_profile(window=100_000))
        fitted = await _fit(
            request(100),
            settings,
            counting_server(40),
            bound=200,
            default_max_tokens=10,
            count_for_budget=True,
        )
        assert fitted.prompt_tokens == 40

    async def test_without_a_count_an_estimate_trims_but_never_refuses(self) -> None:
        """No tokenize endpoint: max_tokens is trimmed by a 4-characters-a-token guess, and
        the prompt is left for the server to judge."""
        settings = resolve(model("m", EP, context_window=4096), ServerProfile(endpoint=EP))
        fitted = await _fit(
            request(4000),
            settings,
            FakeServer({}),
            bound=4100,
            default_max_tokens=8192,
            count_for_budget=False,
        )
        assert fitted.request.max_tokens is not None and fitted.request.max_tokens < 4096
        huge = await _fit(
            request(40_000),
            settings,
            FakeServer({}),
            bound=40_100,
            default_max_tokens=8192,
            count_for_budget=False,
        )
        assert huge.request.max_tokens == 4096


# ============================================================================ the simulator plays vLLM


def vllm_sim(**overrides: Any) -> SimConfig:
    fields: dict[str, Any] = {
        "persona": Persona.vllm(),
        "context_window": 32_768,
        "cache": CacheModel(min_tokens=16, step_tokens=16, available_at="finish"),
    }
    fields.update(overrides)
    return SimConfig(**fields)


class TestSimAsVLLM:
    async def test_models_and_tokenize_answer_as_vllm_does(self) -> None:
        """The persona's `/v1/models` identifies as vLLM with its window, and `/tokenize`
        counts exactly what a chat request with the same messages reports."""
        async with SimServer(vllm_sim()) as sim:
            transport = OpenAITransport(sim.base_url, api_key_env=None)
            try:
                profile = await detect(transport)
                req = request(1000, max_tokens=10)
                req = dataclasses.replace(req, model="sim-mini")
                counted = await count_prompt_tokens(transport, profile, req)
                completion = await transport.complete(req)
            finally:
                await transport.aclose()
        assert (profile.kind, profile.window_for("sim-mini")) == ("vllm", 32_768)
        assert counted == prompt_tokens(req.messages) == completion.usage.prompt_tokens

    async def test_the_default_persona_stays_unidentified(self) -> None:
        """The plain simulator is not mistaken for a known server: today's defaults hold."""
        async with SimServer(SimConfig()) as sim:
            transport = OpenAITransport(sim.base_url, api_key_env=None)
            try:
                profile = await detect(transport)
            finally:
                await transport.aclose()
        assert profile.kind == "unknown"


# ============================================================================ the fan-out

CHUNKS = 100
SUB_LATENCY_S = 2.0
PAD_CHARS = 1_600  # with the sub-call system prompt and the task lines: a ~600-token instruction


def fanout(server: str) -> tuple[RLMResult, list[LogEntry], EventLog]:
    """The issue's run: 100 sub-calls sharing a ~600-token instruction, against a vLLM-like
    server, configured the way most users start (the official constructor, a base_url, no
    cache settings). `server="off"` reproduces what the engine did before it identified
    servers."""
    workload = oolong_counting("100k", seed=3)
    sim = vllm_sim(
        latency=LatencyModel(root=KindLatency(ttft_s=0.01), sub=KindLatency(ttft_s=SUB_LATENCY_S)),
        policies=Policies(
            root=PolicySpec(
                name="rlm", options={"chunks": CHUNKS, "max_chunks": CHUNKS, "pad_chars": PAD_CHARS}
            )
        ),
    )
    events = EventLog()
    with SimProcess(sim) as proc:
        base_url = proc.base_url
        assert base_url is not None
        free = ModelPrice.free()
        official = RLM(
            backend="vllm",
            backend_kwargs={
                "model_name": "sim-model",
                "base_url": base_url,
                "prices": free,
                "server": server,
            },
            other_backends=["vllm"],
            other_backend_kwargs=[
                {"model_name": "sim-mini", "base_url": base_url, "prices": free, "server": server}
            ],
        )
        assert official.config.root.cache is None and official.config.sub is not None
        assert official.config.sub.cache is None
        config: RLMConfig = dataclasses.replace(official.config, sandbox=sandbox_config())

        async def go() -> RLMResult:
            async with RLM(config=config, event_sinks=[events]) as rlm:
                return await rlm.acompletion(workload.context, workload.query)

        result = anyio.run(go)
    log = proc.read_log().entries
    assert result.status == "ok", result.detail
    assert workload.score(result.response), (result.response, workload.truth)
    return result, log, events


@pytest.mark.e2e
@pytest.mark.slow
class TestVLLMFanOut:
    def test_a_vllm_like_server_with_no_cache_config_hits_on_90_percent(self) -> None:
        """Identified as vLLM, the server gets vLLM's cache settings: the 600-token prefix is
        cacheable (16-token blocks), the batch is warmed, and at least 90% of the 100
        sub-calls hit with the whole shared prefix cached (down to whole blocks)."""
        _, log, events = fanout("auto")
        detected = [e.payload() for e in events.of(ServerDetected)]
        assert {d["model"] for d in detected} == {"sim-model", "sim-mini"}
        assert all(d["server"] == "vllm" and d["cache_source"] == "detected" for d in detected)
        decision = events.of(WarmupDecision)[0].payload()
        assert (decision["decision"], decision["reason"]) == ("warm", "pays_off")
        subs = [e for e in log if e.kind == "sub"]
        assert len(subs) == CHUNKS
        prefix = decision["prefix_tokens"]
        assert 550 <= prefix <= 700
        whole = decision["cacheable_tokens"]
        assert whole >= prefix - 16
        hits = [e for e in subs if e.cached_tokens >= whole]
        assert len(hits) >= 0.9 * CHUNKS, f"{len(hits)} of {CHUNKS} hit"

    def test_before_identification_none_of_them_hit(self) -> None:
        """The same run with identification off (what the engine did before): the 600-token
        prefix is judged below OpenAI's 1,024 minimum, nothing is warmed, all go cold at
        once and none of the sub-calls that started before the first finished hit."""
        _, log, events = fanout("off")
        decision = events.of(WarmupDecision)[0].payload()
        assert (decision["decision"], decision["reason"]) == ("skip", "prefix_below_minimum")
        subs = [e for e in log if e.kind == "sub"]
        first_finish = min(e.finish for e in subs)
        early = [e for e in subs if e.start is not None and e.start < first_finish]
        assert len(early) >= 0.9 * CHUNKS and all(e.cached_tokens == 0 for e in early)


# ============================================================================ budgets reserve the count


class TestGovernorCount:
    async def test_a_server_count_replaces_the_byte_bound_in_the_reservation(self) -> None:
        """Given the server's count of the prompt, the governor reserves exactly that, not
        the UTF-8 byte bound (about four times larger for English)."""
        from rlm_async._governor import Governor
        from rlm_async.testing import ScriptedTransport

        governor = Governor()
        transport = ScriptedTransport(lambda r: "ok")
        req = request(4000, max_tokens=10)
        counted = await governor.call(req, transport, prompt_tokens=1001)
        estimated = await governor.call(req, transport)
        assert counted.reserved_input_tokens == 1001
        assert estimated.reserved_input_tokens > 4000


@pytest.mark.e2e
class TestRefusedBeforeSending:
    def test_a_chunk_over_the_detected_window_never_reaches_the_server(self) -> None:
        """The simulator plays vLLM with a 2,048-token window; the root fans out one chunk of
        ~4,000 tokens. Its sub-call is refused before sending, with the chunk's size and the
        window in the message, and the server never sees it."""
        workload = oolong_counting("4k", seed=3)
        sim = vllm_sim(
            context_window=2048,
            policies=Policies(root=PolicySpec(name="rlm", options={"chunks": 1, "pad_chars": 0})),
        )
        events = EventLog()

        async def go() -> tuple[RLMResult, list[LogEntry]]:
            async with SimServer(sim) as server:
                config = RLMConfig(
                    root=model("sim-model", server.base_url),
                    sub=model("sim-mini", server.base_url),
                    sandbox=sandbox_config(),
                    max_iterations=2,
                )
                async with RLM(config=config, event_sinks=[events]) as rlm:
                    result = await rlm.acompletion(workload.context, workload.query)
                return result, list(server.app.log)

        result, log = anyio.run(go)
        # "partial": the run ends, saying its answer was made without the refused sub-calls.
        assert result.status == "partial" and "refused before sending" in (result.detail or ""), result.detail
        assert not [e for e in log if e.kind == "sub"]
        subs = [e.payload() for e in events.of(CallFinish) if e.depth == 1]
        assert subs and all(f["attempts"] == 0 for f in subs)
        assert all("refused before sending" in f["error"] and "2,048 tokens" in f["error"] for f in subs)


class TestDoctor:
    async def test_doctor_shows_each_decision_and_its_source(self, tmp_path: Any) -> None:
        """`rlm-async doctor --config FILE --json` against the simulator playing vLLM: the
        server, the cache settings and window it gets, what was configured, and nothing
        sent but probes."""
        import contextlib
        import io
        import json

        from rlm_async.cli import main

        async with SimServer(vllm_sim(models=("Qwen/Qwen3-8B",), context_window=40_960)) as sim:
            path = tmp_path / "vllm.toml"
            path.write_text(
                f'[root]\nmodel = "Qwen/Qwen3-8B"\nbase_url = "{sim.base_url}"\napi_key_env = ""\n'
                "[root.limits]\nmax_concurrency = 256\n"
            )
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = await anyio.to_thread.run_sync(main, ["doctor", "--config", str(path), "--json"])
            assert code == 0 and len(sim.log) == 0
        (decision,) = json.loads(out.getvalue())
        assert (decision["server"], decision["cache_source"], decision["context_window"]) == (
            "vllm",
            "detected",
            40_960,
        )
        assert (decision["max_concurrency"], decision["limits_source"]) == (256, "configured")
        assert decision["min_cacheable_tokens"] == 16
