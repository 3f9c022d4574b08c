"""The simulator as a raw ASGI application: one request's path from arrival to the log.

A raw ASGI callable rather than a framework: per-request overhead is what benchmarks
subtract from the latency model's lower bound, so the hot path is a dict lookup on the
path, `json.loads`, the policy, `json.dumps` and two `send` calls — no routing layer, no
validation models. A chat completion's pipeline (`respond`) returns its `Reply` rather
than sending it, so the simulator process's own HTTP front (`_front`) drives it without
ASGI at all.

Order of checks for `POST /v1/chat/completions` (each answers as OpenAI would):
auth (401) -> JSON body (400) -> model (404) -> context window (400) -> RPM/TPM (429)
-> injected 500/429 -> capacity queue (FIFO) -> prefix-cache lookup -> policy -> sleep
until the latency model's time has passed since service began (the lookup and the policy
run inside it) -> cache insert -> response (or an injected drop / malformed body).

If the client disconnects, the request is cancelled at once (its capacity slot freed) and
logged as "cancelled": what a server that aborts abandoned generations (vLLM, SGLang) would
record. Its logged tokens are what we assume a provider bills for it: the prompt, if
service had begun (the prefill is done or under way), and no output (none was delivered).
Providers do not document this for non-streaming requests; some may bill more.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import anyio
import orjson

from .._prompts import root_system_prompt, sub_system_prompt
from .._types import Message
from ._config import SimConfig
from ._log import LogEntry, RequestLog
from ._prefix_cache import PrefixCache
from ._ratelimit import RateLimiter
from ._tokens import CHARS_PER_TOKEN, count_tokens, serialize_messages
from .policies import Policy, PolicyRequest, make_policy

__all__ = ["Draft", "Headers", "Reply", "SimApp", "error_reply"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
"""A request's headers as ASGI gives them: (lower-case name, value) pairs."""

_JSON = (b"content-type", b"application/json")
_MARKER_CHARS = 80  # how much of a system prompt identifies it
_TO_UNIT = 2.0**-53  # a 53-bit integer times this: a float in [0, 1)


@dataclass(slots=True)
class Draft:
    """A log entry being filled in while its request is handled."""

    id: str
    seq: int
    arrival: float
    in_flight: int
    start: float | None = None
    served_until: float | None = None
    kind: str = "other"
    model: str | None = None
    status: int | None = None
    outcome: str = "cancelled"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    max_tokens: int | None = None
    finish_reason: str | None = None
    prompt_cache_key: str | None = None
    policy: str | None = None
    modeled_s: float | None = None
    body_sha256: str | None = None
    body: dict[str, Any] | None = None
    logged: bool = False

    def done(self, status: int, outcome: str) -> None:
        self.status, self.outcome = status, outcome

    def entry(self, finish: float) -> LogEntry:
        return LogEntry(
            id=self.id,
            seq=self.seq,
            arrival=self.arrival,
            start=self.start,
            finish=self.served_until if self.served_until is not None else finish,
            kind=self.kind,
            model=self.model,
            status=self.status or 0,
            outcome=self.outcome,
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            completion_tokens=self.completion_tokens,
            max_tokens=self.max_tokens,
            in_flight=self.in_flight,
            finish_reason=self.finish_reason,
            prompt_cache_key=self.prompt_cache_key,
            policy=self.policy,
            modeled_s=self.modeled_s,
            body_sha256=self.body_sha256,
            body=self.body,
        )


@dataclass(frozen=True, slots=True)
class Reply:
    """A chat completion's response, to be written by whatever serves the HTTP."""

    status: int
    headers: Headers
    """Content type and length included."""
    body: bytes
    drop: bool = False
    """An injected fault: send the head and half the body, then close the connection."""


class _Refused(Exception):
    """Ends a request early with an OpenAI-style error response."""

    def __init__(
        self,
        status: int,
        outcome: str,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        self.headers = headers or {}

    def reply(self, request_id: str | None = None) -> Reply:
        return _json_reply(self.status, self.body, self.headers, request_id)


def error_reply(status: int, message: str) -> Reply:
    """An OpenAI-style error response of the server's own (bad HTTP, a bug), for a server
    driving `respond`: "server_error" from 500, else "invalid_request_error"."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return _Refused(status, kind, message, type_=kind).reply()


class SimApp:
    """The ASGI app behind `SimServer` and `SimProcess`. Serve it with any ASGI server on
    asyncio (its disconnect watcher is an asyncio task); state lives on the instance, one
    app per simulated deployment."""

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.config = config = config or SimConfig()
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        self.log = RequestLog(config.log_path)
        self.cache = PrefixCache(config.cache)
        self.limiter = RateLimiter(config.rate_limits, clock())
        self._policies: dict[str, Policy] = {
            kind: make_policy(config.policies.for_kind(kind)) for kind in ("root", "sub", "other")
        }
        # Root turns and everything else run on separate deployments, as a big root model
        # and a small sub model would; "other" shares the sub model's queue and latency.
        self._capacity = {
            kind: anyio.CapacityLimiter(cap) if (cap := config.latency.for_kind(kind).capacity) else None
            for kind in ("root", "sub")
        }
        self._models = frozenset(config.models)
        self._seed_key = hashlib.blake2b(str(config.seed).encode(), digest_size=16).digest()
        self._root_marker = root_system_prompt()[:_MARKER_CHARS]
        self._sub_marker = sub_system_prompt()[:_MARKER_CHARS]
        self._seq = 0
        self._seen: dict[bytes, int] = {}
        self._active: set[anyio.CancelScope] = set()
        self.in_flight = 0
        """Requests inside the app right now (queued, served, or being answered)."""

    # ------------------------------------------------------------ lifecycle

    def cancel_all(self) -> None:
        """Abandon every request in progress (used at shutdown so it does not wait for
        simulated latencies to run out)."""
        for scope in list(self._active):
            scope.cancel()

    def reset(self) -> None:
        """Forget the log, the prefix cache, the rate-limit buckets and the seen-request
        counts, as if the server had just started (in-flight requests go on)."""
        self.log.clear()
        self.cache.clear()
        self.limiter = RateLimiter(self.config.rate_limits, self._clock())
        self._seen.clear()

    def close(self) -> None:
        self.log.close()

    # ------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        path, method = scope["path"], scope["method"]
        if path == "/v1/chat/completions" and method == "POST":
            await self._chat(scope, receive, send)
            return
        if path.startswith("/v1/") and not self._authorized(scope["headers"]):
            await _send_json(send, 401, _auth_error().body)
            return
        if method == "GET" and path == "/v1/models":
            data = [self._model_object(m) for m in self.config.models]
            await _send_json(send, 200, {"object": "list", "data": data})
        elif method == "GET" and path.startswith("/v1/models/"):
            name = path[len("/v1/models/") :]
            if name in self._models:
                await _send_json(send, 200, self._model_object(name))
            else:
                await _send_json(send, 404, _model_error(name).body)
        elif method == "POST" and path == "/tokenize" and self.config.persona.tokenize:
            await self._tokenize(receive, send)
        elif method == "GET" and path == "/sim/log":
            lines = "".join(json.dumps(e.to_dict(), separators=(",", ":")) + "\n" for e in self.log)
            await _send(send, 200, lines.encode(), [(b"content-type", b"application/x-ndjson")])
        elif method == "POST" and path == "/sim/reset":
            self.reset()
            await _send_json(send, 200, {"reset": True})
        elif method == "GET" and path in ("/health", "/sim/health"):
            await _send_json(send, 200, {"ok": True, "in_flight": self.in_flight})
        else:
            body = {"error": {"message": f"Unknown path {method} {path}", "type": "invalid_request_error"}}
            await _send_json(send, 404, body)

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        draft = self.open_request()
        try:
            with anyio.CancelScope() as whole:
                # Registered before the body is read, so shutdown cancels every request.
                self._active.add(whole)
                try:
                    body = await _read_body(receive)
                    if body is None:  # the client left before sending its body
                        return
                    # A plain asyncio task, not an anyio task group: the group's entry, spawn
                    # and cancelling exit cost about 0.12 ms a request, a third of the app's
                    # CPU in a fan-out. The watcher cancels `whole`, which ends the request
                    # as the group's scope did.
                    watcher = asyncio.get_running_loop().create_task(_cancel_on_disconnect(receive, whole))
                    try:
                        reply = await self.respond(draft, scope["headers"], body)
                    finally:
                        watcher.cancel()
                    await _send_reply(send, reply)
                finally:
                    self._active.discard(whole)
        finally:
            self._finish(draft)

    def open_request(self) -> Draft:
        """Count a chat completion in as it arrives (the ASGI entry: before its body is read;
        the front: once it is): its log entry in the making, which `respond` fills in and logs."""
        seq = self._seq
        self._seq += 1
        self.in_flight += 1
        return Draft(id=f"chatcmpl-sim-{seq:06d}", seq=seq, arrival=self._clock(), in_flight=self.in_flight)

    async def respond(self, draft: Draft, headers: Headers, body: bytes) -> Reply:
        """The answer to one chat completion (`headers` as ASGI gives them: lower-case
        names), whatever serves the HTTP: this ASGI app, or the simulator process's own
        front (`_front`). The request is logged before this returns, so a client holding
        the response finds its log entry. Cancelled (the client left, or shutdown), it is
        logged as "cancelled"; an unexpected error is logged as "internal_error" and raised
        (the server answers 500)."""
        try:
            digest = hashlib.sha256(body).digest()
            draft.body_sha256 = digest.hex()
            try:
                return await self._handle(headers, body, digest, draft)
            except _Refused as refused:
                draft.done(refused.status, refused.outcome)
                return refused.reply(draft.id)
            except Exception:
                draft.outcome = "internal_error"  # a bug here; the server answers 500
                raise
        finally:
            self._finish(draft)

    def _finish(self, draft: Draft) -> None:
        """Log the request and count it out, once. Called just before the response is sent,
        so a client holding a response can rely on its log entry being there."""
        if not draft.logged:
            draft.logged = True
            if draft.outcome == "cancelled":  # billed as assumed above: the prompt, no output
                draft.completion_tokens = 0
                if draft.start is None:
                    draft.prompt_tokens = draft.cached_tokens = 0
            self.in_flight -= 1
            self.log.append(draft.entry(self._clock()))

    # ------------------------------------------------------------ the pipeline

    async def _handle(self, headers_in: Headers, body: bytes, digest: bytes, draft: Draft) -> Reply:
        cfg = self.config
        if not self._authorized(headers_in):
            raise _auth_error()
        request = _parse_body(body)
        if cfg.record_bodies:
            draft.body = request
        model = request.get("model")
        draft.model = model if isinstance(model, str) else None
        messages = _parse_messages(request.get("messages"))
        if not isinstance(model, str) or model not in self._models:
            raise _model_error(str(model))
        if request.get("stream"):
            raise _Refused(
                400, "bad_request", "The simulator does not stream; send stream=false.", param="stream"
            )
        max_tokens = _max_tokens(request)
        draft.max_tokens = max_tokens
        key = request.get("prompt_cache_key")
        draft.prompt_cache_key = key if isinstance(key, str) else None
        kind = draft.kind = self._kind(messages)
        prompt_text = serialize_messages(messages)
        prompt_tokens = draft.prompt_tokens = count_tokens(prompt_text)
        asked = prompt_tokens + (max_tokens or 0)
        if cfg.context_window is not None and asked > cfg.context_window:
            raise _Refused(
                400,
                "context_length",
                f"This model's maximum context length is {cfg.context_window} tokens. However, you "
                f"requested {asked} tokens ({prompt_tokens} in the messages, {max_tokens or 0} in the "
                "completion). Please reduce the length of the messages or completion.",
                param="messages",
                code="context_length_exceeded",
            )

        fault_u, jitter_u = self._draws(digest)
        fault = cfg.faults.script[draft.seq] if draft.seq < len(cfg.faults.script) else "ok"
        if draft.seq >= len(cfg.faults.script):
            fault = cfg.faults.draw(fault_u, kind)

        admission = self.limiter.admit(prompt_tokens + (max_tokens or 0), self._clock(), model)
        if not admission.allowed:
            raise _Refused(
                429,
                "rate_limited",
                admission.message or "Rate limit reached.",
                type_=admission.limit_type or "requests",
                code="rate_limit_exceeded",
                headers=admission.headers,
            )
        headers = admission.headers
        if fault == "error_500":
            raise _Refused(
                500,
                "error_500",
                "The server had an error while processing your request. Sorry about that!",
                type_="server_error",
                headers=headers,
            )
        if fault == "error_429":
            wait = cfg.faults.retry_after_s
            raise _Refused(
                429,
                "error_429",
                "The engine is currently overloaded, please try again later.",
                type_="requests",
                code="rate_limit_exceeded",
                headers={
                    **headers,
                    "retry-after": str(max(1, round(wait))),
                    "retry-after-ms": str(round(wait * 1000)),
                },
            )

        policy = self._policies[kind]
        draft.policy = policy.name
        capacity = self._capacity["root" if kind == "root" else "sub"]
        async with capacity if capacity is not None else contextlib.nullcontext():
            start = draft.start = self._clock()
            namespace = model
            if cfg.cache.partition_by_cache_key and draft.prompt_cache_key:
                namespace += "\x00" + draft.prompt_cache_key
            blocks = self.cache.blocks(namespace, prompt_text)
            cached = draft.cached_tokens = self.cache.lookup(blocks, start)
            try:
                reply = policy(
                    PolicyRequest(model=model, messages=messages, kind=kind, max_tokens=max_tokens)
                )
            except Exception as exc:  # a bug in a policy: say so instead of hanging the client
                raise _Refused(
                    500, "policy_error", f"policy {policy.name!r} failed: {exc!r}", type_="server_error"
                ) from None
            cap = max_tokens if max_tokens is not None else cfg.max_output_tokens
            finish_reason = "stop"
            if count_tokens(reply) > cap:
                reply, finish_reason = reply[: cap * CHARS_PER_TOKEN], "length"
            completion_tokens = draft.completion_tokens = count_tokens(reply)
            draft.finish_reason = finish_reason
            first, decode = cfg.latency.phases(
                kind,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                cached_tokens=cached,
                jitter_u=jitter_u,
            )
            if fault == "slow":
                decode += cfg.faults.slow_extra_s
            draft.modeled_s = first + decode
            # Deadlines counted from `start`: the simulator's own work since then (cache
            # lookup, policy) is spent inside the modeled time, not added to it.
            first_due = start + first
            if cfg.cache.available_at == "first_token":
                if first > 0:
                    await self._sleep_until(first_due)
                self.cache.insert(blocks, self._clock())
                if decode > 0:
                    await self._sleep_until(first_due + decode)
            elif first > 0 or decode > 0:  # nothing happens at the first token: one sleep
                await self._sleep_until(first_due + decode)
            if cfg.cache.available_at == "finish":
                self.cache.insert(blocks, self._clock())
            # Logged as the finish: the moment the slot frees, so service intervals in the log
            # never overlap more than `capacity` (sending the bytes is not model time).
            draft.served_until = self._clock()
            service_ms = int((draft.served_until - start) * 1000)

        payload = _completion_json(
            draft.id,
            int(self._wall_clock()),
            model,
            reply,
            finish_reason,
            prompt_tokens,
            completion_tokens,
            cached,
            report_usage=cfg.report_usage,
        )
        headers = {**headers, "openai-processing-ms": str(service_ms)}
        if fault == "drop":
            # Headers and half the body, then the connection closes: the client sees a
            # connection error mid-response.
            draft.done(0, "drop")
            return Reply(200, _headers(headers, len(payload), draft.id), payload, drop=True)
        if fault == "malformed":
            payload = payload[: len(payload) // 2]
        draft.done(200, fault if fault in ("malformed", "slow") else "ok")
        return Reply(200, _headers(headers, len(payload), draft.id), payload)

    # ------------------------------------------------------------ helpers

    def _model_object(self, name: str) -> dict[str, Any]:
        persona, window = self.config.persona, self.config.context_window
        card: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": persona.owned_by}
        if persona.report_max_model_len and window is not None:
            card["max_model_len"] = window
        return card

    async def _tokenize(self, receive: Receive, send: Send) -> None:
        """vLLM's `POST /tokenize`: the prompt tokens a chat request with these messages
        would report (`messages`), or the tokens of a plain `prompt`."""
        body = await _read_body(receive)
        try:
            request = _parse_body(body or b"")
            if "messages" in request:
                n = count_tokens(serialize_messages(_parse_messages(request["messages"])))
            else:
                prompt = request.get("prompt")
                if not isinstance(prompt, str):
                    raise _Refused(400, "bad_request", "send `messages` or a string `prompt`", param="prompt")
                n = count_tokens(prompt)
        except _Refused as refused:
            await _send_json(send, refused.status, refused.body)
            return
        await _send_json(
            send, 200, {"count": n, "max_model_len": self.config.context_window, "tokens": list(range(n))}
        )

    async def _sleep_until(self, deadline: float) -> None:
        await self._sleep(max(0.0, deadline - self._clock()))

    def _authorized(self, headers: Headers) -> bool:
        key = self.config.api_key
        if key is None:
            return True
        for name, value in headers:
            if name == b"authorization":
                return bool(value[:7].lower() == b"bearer " and value[7:] == key.encode())
        return False

    def _kind(self, messages: tuple[Message, ...]) -> str:
        if messages and messages[0].role in ("system", "developer"):
            head = messages[0].content[:_MARKER_CHARS]
            if head == self._root_marker:
                return "root"
            if head == self._sub_marker:
                return "sub"
        return "other"

    def _draws(self, body_sha256: bytes) -> tuple[float, float]:
        """Two uniform draws for this request: faults and jitter. Keyed by the seed, the body
        and how many times this exact body was seen, so a retry draws afresh and a run is
        reproducible whatever order concurrent requests arrive in.

        From the body's SHA-256, which the log needs anyway, rather than a second hash of the
        whole body (a keyed BLAKE2b of a 46 KB body was 50 us, a seventh of the app's CPU a
        request): a keyed BLAKE2b of the digest and the count, cut into two 53-bit fractions
        as `random.random()` makes them."""
        n = self._seen.get(body_sha256, 0)
        self._seen[body_sha256] = n + 1
        key = body_sha256 + n.to_bytes(8, "big")
        draw = hashlib.blake2b(key, digest_size=16, key=self._seed_key).digest()
        fault = int.from_bytes(draw[:8], "big") >> 11
        jitter = int.from_bytes(draw[8:], "big") >> 11
        return fault * _TO_UNIT, jitter * _TO_UNIT


# ================================================================ request parsing


def _parse_body(body: bytes) -> dict[str, Any]:
    try:
        # orjson: about four times faster than `json` on a fan-out's 10-50 KB bodies. It
        # refuses a few things `json` takes (NaN, integers over 64 bits, escaped lone
        # surrogates), so whatever it refuses is parsed again by `json`, which decides.
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = _parse_body_stdlib(body)
    if not isinstance(data, dict):
        raise _Refused(400, "bad_request", "The request body must be a JSON object.")
    return data


def _parse_body_stdlib(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Refused(
            400,
            "bad_request",
            f"We could not parse the JSON body of your request. ({exc})",
        ) from None


def _parse_messages(raw: Any) -> tuple[Message, ...]:
    if not isinstance(raw, list) or not raw:
        raise _Refused(400, "bad_request", "'messages' must be a non-empty array.", param="messages")
    out: list[Message] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _Refused(400, "bad_request", f"messages[{i}] needs a 'role'.", param=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise _Refused(
                400, "bad_request", f"messages[{i}].content must be a string.", param=f"messages[{i}]"
            )
        out.append(Message(m["role"], content))
    return tuple(out)


def _max_tokens(request: dict[str, Any]) -> int | None:
    value = request.get("max_completion_tokens")
    if value is None:
        value = request.get("max_tokens")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _Refused(
            400, "bad_request", f"max_tokens must be a positive integer, got {value!r}.", param="max_tokens"
        )
    return value


def _auth_error() -> _Refused:
    return _Refused(
        401,
        "unauthorized",
        "Incorrect API key provided. The simulator was started with an API key; send it as a Bearer token.",
        code="invalid_api_key",
    )


def _model_error(name: str) -> _Refused:
    return _Refused(
        404,
        "not_found",
        f"The model `{name}` does not exist or you do not have access to it.",
        code="model_not_found",
    )


# ================================================================ responses


def _completion_json(
    id_: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    *,
    report_usage: bool = True,
) -> bytes:
    body: dict[str, Any] = {
        "id": id_,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        },
        "system_fingerprint": "rlm-async-sim",
    }
    if not report_usage:
        del body["usage"]
    try:
        return orjson.dumps(body)  # the same compact JSON as below, several times faster
    except TypeError:  # a lone surrogate in the reply, which orjson refuses to encode
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")


def _headers(extra: dict[str, str], length: int, request_id: str | None) -> Headers:
    out = [_JSON, (b"content-length", str(length).encode())]
    if request_id is not None:
        out.append((b"x-request-id", request_id.encode()))
    out.extend((k.encode(), v.encode()) for k, v in extra.items())
    return out


async def _send(send: Send, status: int, body: bytes, headers: Headers) -> None:
    if not any(k == b"content-length" for k, _ in headers):
        headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _json_reply(status: int, obj: Any, extra: dict[str, str], request_id: str | None) -> Reply:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return Reply(status, _headers(extra, len(body), request_id), body)


async def _send_reply(send: Send, reply: Reply) -> None:
    if not reply.drop:
        await _send(send, reply.status, reply.body, reply.headers)
        return
    await send({"type": "http.response.start", "status": reply.status, "headers": reply.headers})
    # Returning without finishing the body makes the ASGI server close the connection.
    await send({"type": "http.response.body", "body": reply.body[: len(reply.body) // 2], "more_body": True})


async def _send_json(
    send: Send,
    status: int,
    obj: Any,
    extra: dict[str, str] | None = None,
    request_id: str | None = None,
) -> None:
    await _send_reply(send, _json_reply(status, obj, extra or {}, request_id))


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or `None` if the client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    """Cancel the request's handling when the client goes away (or its `receive` fails,
    which leaves no client to answer)."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:
        pass  # nobody awaits this task: its error would only be logged as never retrieved
    scope.cancel()
