"""Know the server: what an OpenAI-compatible endpoint is, learned at its first use, and the
defaults that follow from it.

    profile = await detect(transport)                   # a few small GETs, once per endpoint
    settings = resolve(model_config, profile)           # explicit configuration always wins
    emit(ServerDetected, **settings.event_fields())
    fitted = await fit(request, settings, transport, ...)   # refuse or trim before sending

**Identify.** The host names OpenAI (`api.openai.com`). Otherwise `GET /v1/models` says who
owns the models (`owned_by`: vLLM says "vllm", SGLang "sglang", llama.cpp's `llama-server`
"llamacpp", Ollama "library", llama-cpp-python "me") — and one field is not proof:
llama-cpp-python's "me" could be anyone's, and a proxy may copy any of them. So a kind is
decided only when a second, independent sign agrees: vLLM's and SGLang's model cards carry
`max_model_len`; llama.cpp answers `GET /props`; llama-cpp-python's OpenAPI document is
titled "llama.cpp Python API"; Ollama answers `GET /api/version`. Anything less is
"unknown", and an unknown server keeps today's defaults.

**Default from it** (`resolve`), each only where the configuration says nothing:

* the prefix-cache settings (`CacheSettings.vllm()` for vLLM: 16-token blocks, warmed when
  the planner's rule says it pays; nothing to warm on llama.cpp, Ollama or llama-cpp-python,
  whose caches are per slot);
* the context window (vLLM/SGLang `max_model_len`, llama.cpp `n_ctx` from `/props`; or, for
  a server that reports none, the number its first `context_length_exceeded` error names);
* token counting through the server's own tokenizer (vLLM and SGLang `POST /tokenize`,
  llama.cpp `POST /apply-template` + `/tokenize`, llama-cpp-python `/extras/tokenize`);
* concurrency, where the server says how many requests it works on at once (llama.cpp's
  slots; llama-cpp-python serves one at a time): more in flight would only queue at the
  server, where the HTTP timeout runs; queued here, it does not.

**Fit** (`fit`): a prompt that cannot fit the window is refused before it is sent
(`ContextLengthExceeded` naming the chunk's size and the window), and `max_tokens` is cut to
what still fits, since servers count prompt + `max_tokens` against the window.

What it is not: a guarantee. A server that lies about itself is "unknown" at best; the
server's own answers (usage, errors) remain the authority, and `rlm-async doctor --config
FILE` shows what was decided before anything is sent.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from ._cache import CacheSettings
from ._governor import EndpointLimits
from ._types import ModelRequest
from .exceptions import ContextLengthExceeded
from .transport import ProbeResponse, Transport

if TYPE_CHECKING:
    from ._config import ModelConfig

__all__ = [
    "SERVER_KINDS",
    "Fitted",
    "ServerKind",
    "ServerProfile",
    "ServerSettings",
    "count_prompt_tokens",
    "detect",
    "diagnose",
    "fit",
    "identify",
    "report",
    "resolve",
    "window_from_error",
]

ServerKind = Literal["openai", "vllm", "sglang", "llamacpp", "llama-cpp-python", "ollama", "unknown"]
SERVER_KINDS: tuple[str, ...] = ("openai", "vllm", "sglang", "llamacpp", "llama-cpp-python", "ollama")
"""Kinds `ModelConfig.server` may name to skip identification."""

Source = Literal["configured", "detected", "default"]
Tokenizer = Literal["vllm", "sglang", "llamacpp", "llama-cpp-python"]
"""Which tokenize endpoint (and body) a server has."""

_OPENAI_HOSTS = ("api.openai.com",)
_LLAMA_CPP_PYTHON_TITLE = "llama.cpp python api"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerProfile:
    """What an endpoint is, as far as its answers show. Plain data from `identify`."""

    endpoint: str
    kind: ServerKind = "unknown"
    evidence: tuple[str, ...] = ()
    """What was seen, one clause each, for the event and `doctor`."""
    windows: Mapping[str, int] = field(default_factory=dict)
    """Context window per served model, where the server reports one per model (vLLM)."""
    window: int | None = None
    """Context window for every model, where the server reports one (llama.cpp `n_ctx`)."""
    tokenizer: Tokenizer | None = None
    """The server's tokenize endpoint, if it has one."""
    parallel: int | None = None
    """Requests the server works on at once, where it says or is known to."""

    def window_for(self, model: str) -> int | None:
        return self.windows.get(model, self.window)


def _root(endpoint: str) -> str:
    """The server's root: the base URL without its `/v1`, where llama.cpp's `/props`,
    vLLM's `/tokenize` and Ollama's `/api/version` live."""
    return endpoint[: -len("/v1")] if endpoint.endswith("/v1") else endpoint


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _cards(models: ProbeResponse | None) -> list[dict[str, Any]]:
    if models is None or models.status != 200 or not isinstance(models.body, dict):
        return []
    data = models.body.get("data")
    return [c for c in data if isinstance(c, dict)] if isinstance(data, list) else []


def _ok_dict(response: ProbeResponse | None) -> dict[str, Any] | None:
    if response is None or response.status != 200 or not isinstance(response.body, dict):
        return None
    return response.body


def _said(response: ProbeResponse | None) -> str:
    return "no answer" if response is None else f"{response.status}"


def identify(
    endpoint: str, models: ProbeResponse | None, probes: Mapping[str, ProbeResponse | None]
) -> ServerProfile:
    """The profile the answers support. `models` is `GET /v1/models`; `probes` holds the
    second probe `second_probe` asked for, by its path. Pure: no I/O."""
    host = urlsplit(endpoint).hostname
    if host in _OPENAI_HOSTS:
        return ServerProfile(endpoint=endpoint, kind="openai", evidence=(f"host {host}",))
    cards = _cards(models)
    if not cards:
        return ServerProfile(endpoint=endpoint, evidence=(f"GET /v1/models: {_said(models)}, no model list",))
    owners = sorted({str(c.get("owned_by")) for c in cards})
    evidence = [f"GET /v1/models: owned_by {', '.join(repr(o) for o in owners)}"]
    windows = {str(c.get("id")): w for c in cards if (w := _positive_int(c.get("max_model_len"))) is not None}
    if windows:
        evidence.append(f"max_model_len {', '.join(f'{m}={w}' for m, w in sorted(windows.items()))}")

    def profile(kind: ServerKind, **kw: Any) -> ServerProfile:
        return ServerProfile(endpoint=endpoint, kind=kind, evidence=tuple(evidence), **kw)

    owner = owners[0] if len(owners) == 1 else None
    if owner in ("vllm", "sglang"):
        if windows:  # both put max_model_len on their model cards; OpenAI and the rest do not
            if owner == "vllm":
                return profile("vllm", windows=windows, tokenizer="vllm")
            return profile("sglang", windows=windows, tokenizer="sglang")
        info = _ok_dict(probes.get("/get_model_info"))
        if owner == "sglang" and info is not None and "model_path" in info:
            evidence.append("GET /get_model_info: model_path")
            return profile("sglang", tokenizer="sglang")
        evidence.append(f"no max_model_len: {owner} not confirmed")
    elif owner == "llamacpp":
        props = _ok_dict(probes.get("/props"))
        if props is not None:
            settings = props.get("default_generation_settings")
            n_ctx = _positive_int(props.get("n_ctx")) or (
                _positive_int(settings.get("n_ctx")) if isinstance(settings, dict) else None
            )
            slots = _positive_int(props.get("total_slots"))
            evidence.append(f"GET /props: n_ctx {n_ctx}, total_slots {slots}")
            return profile("llamacpp", window=n_ctx, tokenizer="llamacpp", parallel=slots)
        evidence.append(f"GET /props: {_said(probes.get('/props'))}: llama.cpp not confirmed")
    elif owner == "me":
        doc = _ok_dict(probes.get("/openapi.json"))
        info = doc.get("info") if doc is not None else None
        title = str(info.get("title", "")) if isinstance(info, dict) else ""
        if _LLAMA_CPP_PYTHON_TITLE in title.lower():
            evidence.append(f"GET /openapi.json: title {title!r}")
            # One model object behind a lock: requests are served one at a time.
            return profile("llama-cpp-python", tokenizer="llama-cpp-python", parallel=1)
        evidence.append("GET /openapi.json: not llama-cpp-python's")
    elif owner in ("library", "ollama"):
        version = _ok_dict(probes.get("/api/version"))
        if version is not None and "version" in version:
            evidence.append(f"GET /api/version: {version['version']}")
            return profile("ollama")
        evidence.append("GET /api/version: no answer: Ollama not confirmed")
    return profile("unknown", windows=windows)


def second_probe(models: ProbeResponse | None) -> str | None:
    """The one more path worth a GET to confirm what `/v1/models` suggests (see `identify`)."""
    owners = {str(c.get("owned_by")) for c in _cards(models)}
    if owners == {"llamacpp"}:
        return "/props"
    if owners == {"me"}:
        return "/openapi.json"
    if owners == {"sglang"}:
        return "/get_model_info"
    if owners & {"library", "ollama"} and len(owners) == 1:
        return "/api/version"
    return None


async def detect(transport: Transport, *, timeout_s: float = 5.0) -> ServerProfile:
    """Identify the server behind `transport` with at most two GETs. A server that cannot be
    probed (a test double, no answer, an error) is "unknown"; this never raises for it."""
    endpoint = transport.endpoint
    if urlsplit(endpoint).hostname in _OPENAI_HOSTS:
        return identify(endpoint, None, {})
    models = await transport.probe("GET", endpoint + "/models", timeout_s=timeout_s)
    if models is None and not endpoint.startswith(("http://", "https://")):
        return ServerProfile(endpoint=endpoint, evidence=("the transport cannot probe",))
    probes: dict[str, ProbeResponse | None] = {}
    path = second_probe(models)
    if path is not None:
        probes[path] = await transport.probe("GET", _root(endpoint) + path, timeout_s=timeout_s)
    return identify(endpoint, models, probes)


# ====================================================================== defaults


def _cache_for(kind: ServerKind) -> CacheSettings | None:
    if kind == "openai":
        return CacheSettings.openai()
    if kind == "vllm":
        return CacheSettings.vllm()
    if kind == "sglang":
        return CacheSettings.sglang()
    if kind in ("llamacpp", "llama-cpp-python", "ollama"):
        # Their prompt caches are per slot (the request before, on the same slot): a warm-up
        # would not be shared by a fan-out, so nothing waits for one.
        return CacheSettings(min_cacheable_tokens=0, step_tokens=1, warm=False)
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSettings:
    """What the engine uses for one model on one endpoint, and where each setting came from:
    the configuration, the server (detected), or today's defaults."""

    model: str
    profile: ServerProfile
    cache: CacheSettings
    cache_source: Source
    context_window: int | None
    window_source: Source | Literal["server error"]
    limits: EndpointLimits
    limits_source: Source
    count_tokens: bool
    """Prompts are counted by the server's tokenizer where a window or a budget needs it."""

    def event_fields(self) -> dict[str, Any]:
        """Fields of the `server.detected` event (`_events.ServerDetected`)."""
        c = self.cache
        return {
            "endpoint": self.profile.endpoint,
            "model": self.model,
            "server": self.profile.kind,
            "evidence": "; ".join(self.profile.evidence),
            "min_cacheable_tokens": c.min_cacheable_tokens,
            "step_tokens": c.step_tokens,
            "warm": c.warm if isinstance(c.warm, str) else "on" if c.warm else "off",
            "send_prompt_cache_key": c.send_prompt_cache_key,
            "cache_source": self.cache_source,
            "context_window": self.context_window,
            "window_source": self.window_source,
            "max_concurrency": self.limits.max_concurrency,
            "limits_source": self.limits_source,
            "count_tokens": self.profile.tokenizer if self.count_tokens else None,
        }

    def lines(self) -> list[str]:
        """The decision in words, one setting a line (what `rlm-async doctor` prints)."""
        c = self.cache
        cache = (
            f"caches from {c.min_cacheable_tokens} tokens in steps of {c.step_tokens}; warm-up "
            f"{c.warm if isinstance(c.warm, str) else 'on' if c.warm else 'off'}; prompt_cache_key "
            f"{'sent' if c.send_prompt_cache_key else 'not sent'}"
        )
        window = f"{self.context_window:,} tokens" if self.context_window else "unknown (not checked)"
        counting = (
            f"the server's tokenizer ({self.profile.tokenizer})"
            if self.count_tokens
            else "estimated (UTF-8 byte bound)"
        )
        return [
            f"server:          {self.profile.kind}  ({'; '.join(self.profile.evidence) or 'no evidence'})",
            f"prefix cache:    {cache}  [{self.cache_source}]",
            f"context window:  {window}  [{self.window_source}]",
            f"token counting:  {counting}",
            f"concurrency:     {self.limits.max_concurrency}  [{self.limits_source}]",
        ]

    def with_window(self, window: int) -> ServerSettings:
        return dataclasses.replace(self, context_window=window, window_source="server error")


_TOKENIZERS: dict[str, Tokenizer] = {
    "vllm": "vllm",
    "sglang": "sglang",
    "llamacpp": "llamacpp",
    "llama-cpp-python": "llama-cpp-python",
}


def _as_configured(server: str, profile: ServerProfile) -> ServerProfile:
    """`ModelConfig.server` names the kind (or turns probing off): it wins over `identify`."""
    if server == "off":
        return ServerProfile(endpoint=profile.endpoint, evidence=("server = 'off' in the configuration",))
    if server == "auto" or server == profile.kind:
        return profile
    return dataclasses.replace(
        profile,
        kind=server,  # type: ignore[arg-type]  # validated by ModelConfig against SERVER_KINDS
        evidence=(f"server = {server!r} in the configuration", *profile.evidence),
        tokenizer=_TOKENIZERS.get(server),
        parallel=profile.parallel or (1 if server == "llama-cpp-python" else None),
    )


def resolve(model: ModelConfig, profile: ServerProfile) -> ServerSettings:
    """The settings for `model` on the server `profile` describes. Explicit configuration
    always wins; what the server did not show leaves today's defaults."""
    profile = _as_configured(model.server, profile)
    detected_cache = _cache_for(profile.kind)
    cache_source: Source
    limits_source: Source
    if model.cache is not None:
        cache, cache_source = model.cache, "configured"
    elif detected_cache is not None:
        cache, cache_source = detected_cache, "detected"
    else:
        cache, cache_source = model.cache_settings(), "default"
    window = profile.window_for(model.model)
    if model.context_window is not None:
        window_pair: tuple[int | None, Source] = (model.context_window, "configured")
    else:
        window_pair = (window, "detected" if window is not None else "default")
    if model.limits != EndpointLimits():
        limits, limits_source = model.limits, "configured"
    elif profile.parallel is not None:
        limits = dataclasses.replace(model.limits, max_concurrency=profile.parallel)
        limits_source = "detected"
    else:
        limits, limits_source = model.limits, "default"
    return ServerSettings(
        model=model.model,
        profile=profile,
        cache=cache,
        cache_source=cache_source,
        context_window=window_pair[0],
        window_source=window_pair[1],
        limits=limits,
        limits_source=limits_source,
        count_tokens=profile.tokenizer is not None,
    )


_WINDOW_IN_ERROR = re.compile(
    r"(?:maximum context length is|context window of|context size of|n_ctx[ =:]+)\s*\(?(\d+)",
    re.IGNORECASE,
)


def window_from_error(message: str) -> int | None:
    """The context window a `context_length_exceeded` error names (vLLM and OpenAI: "maximum
    context length is N tokens"; llama-cpp-python: "exceed context window of N"), or `None`."""
    found = _WINDOW_IN_ERROR.search(message)
    return int(found.group(1)) if found else None


# ====================================================================== counting and fitting

# Chat-template allowance where the server tokenizes text, not messages: role headers and
# end-of-turn markers per message, BOS and the assistant header per request (Gemma's template
# adds 5 a message and 4 a request; ChatML 5 and 3).
_PER_MESSAGE = 8
_PER_REQUEST = 16


def _text_of(request: ModelRequest) -> str:
    return "\n".join(m.content for m in request.messages)


async def count_prompt_tokens(
    transport: Transport, profile: ServerProfile, request: ModelRequest, *, timeout_s: float = 30.0
) -> int | None:
    """The request's prompt tokens by the server's own tokenizer: exact where the server
    applies the chat template itself (vLLM's messages form, llama.cpp's `/apply-template`),
    otherwise its count of the text plus a template allowance (an upper bound). `None`
    where the server has no tokenize endpoint or it did not answer."""
    root = _root(profile.endpoint)
    style = profile.tokenizer
    if style == "vllm":
        body: dict[str, Any] = {"model": request.model, "messages": [m.to_dict() for m in request.messages]}
        got = _ok_dict(await transport.probe("POST", root + "/tokenize", body, timeout_s=timeout_s))
        return _positive_int(got.get("count")) if got is not None else None
    allowance = _PER_MESSAGE * len(request.messages) + _PER_REQUEST
    if style == "sglang":
        body = {"model": request.model, "prompt": _text_of(request)}
        got = _ok_dict(await transport.probe("POST", root + "/tokenize", body, timeout_s=timeout_s))
        n = _positive_int(got.get("count")) if got is not None else None
        return n + allowance if n is not None else None
    if style == "llamacpp":
        messages = [m.to_dict() for m in request.messages]
        applied = _ok_dict(
            await transport.probe(
                "POST", root + "/apply-template", {"messages": messages}, timeout_s=timeout_s
            )
        )
        prompt = applied.get("prompt") if applied is not None else None
        if not isinstance(prompt, str):
            return None
        got = _ok_dict(
            await transport.probe(
                "POST", root + "/tokenize", {"content": prompt, "add_special": True}, timeout_s=timeout_s
            )
        )
        tokens = got.get("tokens") if got is not None else None
        return len(tokens) if isinstance(tokens, list) else None
    if style == "llama-cpp-python":
        body = {"input": _text_of(request), "model": request.model}
        got = _ok_dict(
            await transport.probe("POST", root + "/extras/tokenize/count", body, timeout_s=timeout_s)
        )
        n = _positive_int(got.get("count")) if got is not None else None
        return n + allowance if n is not None else None
    return None


@dataclass(frozen=True, slots=True)
class Fitted:
    """A request made to fit its model's context window."""

    request: ModelRequest
    prompt_tokens: int | None
    """The server's count of the prompt, when it was counted (budgets reserve it exactly)."""


async def fit(
    request: ModelRequest,
    settings: ServerSettings,
    transport: Transport,
    *,
    bound: int,
    guess: int,
    default_max_tokens: int,
    count_for_budget: bool,
) -> Fitted:
    """Refuse a prompt that cannot fit the context window, before it is sent; cut
    `max_tokens` to what still fits. `bound` is the budget estimator's upper bound of the
    prompt: when prompt bound + `max_tokens` fit the window, nothing needs counting.
    `guess` is a fair estimate of it (the governor's rate estimator, which compaction uses
    too), for trimming `max_tokens` when the server cannot count.
    `count_for_budget`: count anyway, because a budget cap wants an exact reservation."""
    window = settings.context_window
    max_tokens = request.max_tokens if request.max_tokens is not None else default_max_tokens
    needs_window = window is not None and bound + max_tokens > window
    if not (needs_window or count_for_budget):
        return Fitted(request, None)
    counted = (
        await count_prompt_tokens(transport, settings.profile, request) if settings.count_tokens else None
    )
    if not needs_window or window is None:
        return Fitted(request, counted)
    # Without the server's count, the fair guess trims max_tokens; only a count refuses, so
    # an estimate never turns away a prompt the server would take.
    prompt = counted if counted is not None else guess
    if counted is not None and counted >= window:
        chunk = request.messages[-1].content
        raise ContextLengthExceeded(
            f"refused before sending: a prompt of {counted:,} tokens (its last message, the chunk, "
            f"is {len(chunk):,} characters) does not fit {settings.model!r}'s context window of "
            f"{window:,} tokens on {settings.profile.endpoint} ({settings.window_source}); "
            "send smaller chunks"
        )
    room = window - prompt
    if room < max_tokens and room > 0:
        request = dataclasses.replace(request, max_tokens=room)
    return Fitted(request, counted)


async def diagnose(
    models: Sequence[ModelConfig], transport_for: Callable[[ModelConfig], Transport]
) -> list[ServerSettings]:
    """What the engine would decide for each model, probing each endpoint once: the server
    section of `rlm-async doctor`. Nothing is sent but the probes."""
    profiles: dict[str, ServerProfile] = {}
    out: list[ServerSettings] = []
    seen: set[tuple[str, str]] = set()
    for model in models:
        if (model.base_url, model.model) in seen:
            continue
        seen.add((model.base_url, model.model))
        transport = transport_for(model)
        profile = profiles.get(transport.endpoint)
        if profile is None and model.server != "off":
            profile = profiles[transport.endpoint] = await detect(transport)
        out.append(resolve(model, profile or ServerProfile(endpoint=transport.endpoint)))
    return out


def report(settings: Sequence[ServerSettings]) -> list[str]:
    """`doctor`'s server section in words: each model's settings under its endpoint."""
    out: list[str] = []
    for s in settings:
        out.append(f"{s.model} at {s.profile.endpoint}")
        out.extend("  " + line for line in s.lines())
    return out
