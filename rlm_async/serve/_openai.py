"""OpenAI's chat-completions format, both ways: a request's messages into a context and a
query, and a finished query into a `chat.completion` or a stream of `chat.completion.chunk`s.

A plain client needs no extension: the last user message is the query and the messages
before it are the context (one message: a `str`; several: a `list` of `str`). A request
with a single user message uses its content as the context and asks the root to respond to
it. The `rlm` extension object (`extra_body={"rlm": {...}}` in the openai SDK) names the
context explicitly (inline, or an uploaded file's id) and sets per-request limits, which the
server bounds by its own (`RequestLimits`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from .._context import Context
from ._errors import APIError

__all__ = [
    "RESPOND_PROMPT",
    "ChatRequest",
    "ContextSpec",
    "RLMOptions",
    "chunk",
    "completion_body",
    "parse_chat_request",
    "parse_rlm_options",
]

RESPOND_PROMPT = (
    "The context is a message from a user. Respond to it as a helpful assistant would: answer its "
    "question or do what it asks."
)
"""The query when a request holds a single user message (its content is the context)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ContextSpec:
    """Where the context comes from: inline data or an uploaded file."""

    inline: Context | None = None
    file_id: str | None = None
    file_format: str = "text"
    """"text" (the file's UTF-8 content is a `str`) or "json" (a list, dict or str)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RLMOptions:
    """The `rlm` extension object, every field optional."""

    context: ContextSpec | None = None
    query: str | None = None
    max_depth: int | None = None
    max_usd: float | None = None
    max_seconds: float | None = None
    progress: str = "comments"
    """In a chat stream: "comments" (SSE comment lines, which every SSE parser skips; the
    default, because the openai SDK turns every dispatched event into a chunk), "events"
    (named `rlm.progress` events, for clients that read them) or "none"."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatRequest:
    model: str
    context: ContextSpec
    query: str
    stream: bool
    include_usage: bool
    options: RLMOptions


def _text_of(content: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's list of content parts (text parts only)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise APIError(400, f"{where}: only text content parts are supported", param=where)
        return "".join(parts)
    if content is None:
        return ""
    raise APIError(400, f"{where}: content must be a string or a list of text parts", param=where)


def _number(options: dict[str, Any], name: str, kind: type) -> Any:
    value = options.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not isinstance(value, int))
    ):
        raise APIError(
            400, f"rlm.{name} must be a {'whole ' if kind is int else ''}number", param=f"rlm.{name}"
        )
    if value <= 0:
        raise APIError(400, f"rlm.{name} must be above 0, got {value}", param=f"rlm.{name}")
    return value


def parse_rlm_options(raw: Any) -> RLMOptions:
    """Read the `rlm` extension object (also the body of `POST /v1/rlm/jobs`)."""
    if raw is None:
        return RLMOptions()
    if not isinstance(raw, dict):
        raise APIError(400, "rlm must be an object", param="rlm")
    known = {
        "context",
        "file_id",
        "context_format",
        "query",
        "max_depth",
        "max_usd",
        "max_seconds",
        "progress",
    }
    unknown = sorted(set(raw) - known)
    if unknown:
        raise APIError(400, f"rlm has unknown field(s) {unknown}; known: {sorted(known)}", param="rlm")
    context: ContextSpec | None = None
    fmt = raw.get("context_format", "text")
    if fmt not in ("text", "json"):
        raise APIError(400, "rlm.context_format must be 'text' or 'json'", param="rlm.context_format")
    if "file_id" in raw:
        if not isinstance(raw["file_id"], str):
            raise APIError(400, "rlm.file_id must be a string", param="rlm.file_id")
        if "context" in raw:
            raise APIError(400, "give rlm.context or rlm.file_id, not both", param="rlm")
        context = ContextSpec(file_id=raw["file_id"], file_format=fmt)
    elif "context" in raw:
        value = raw["context"]
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise APIError(400, "rlm.context as a list must hold strings", param="rlm.context")
        if not isinstance(value, (str, list, dict)):
            raise APIError(
                400, "rlm.context must be a string, a list of strings or an object", param="rlm.context"
            )
        context = ContextSpec(inline=value)
    query = raw.get("query")
    if query is not None and not isinstance(query, str):
        raise APIError(400, "rlm.query must be a string", param="rlm.query")
    progress = raw.get("progress", "comments")
    if progress not in ("comments", "events", "none"):
        raise APIError(400, "rlm.progress must be 'comments', 'events' or 'none'", param="rlm.progress")
    return RLMOptions(
        context=context,
        query=query,
        max_depth=_number(raw, "max_depth", int),
        max_usd=_number(raw, "max_usd", float),
        max_seconds=_number(raw, "max_seconds", float),
        progress=progress,
    )


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a `POST /v1/chat/completions` body and map it onto a context and a query."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "you must provide a model parameter", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty array", param="messages")
    texts: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in (
            "system",
            "developer",
            "user",
            "assistant",
            "tool",
        ):
            raise APIError(400, f"messages[{i}] must be an object with a valid role", param=f"messages[{i}]")
        texts.append((m["role"], _text_of(m.get("content"), f"messages[{i}].content")))
    n = body.get("n", 1)
    if n != 1:
        raise APIError(400, "n must be 1: one RLM run gives one answer", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be a boolean", param="stream")
    stream_options = body.get("stream_options") or {}
    include_usage = bool(isinstance(stream_options, dict) and stream_options.get("include_usage"))
    options = parse_rlm_options(body.get("rlm"))

    last_user = max((i for i, (role, _) in enumerate(texts) if role == "user"), default=None)
    if options.query is not None:
        query = options.query
        before = texts
    elif last_user is None:
        raise APIError(400, "messages must include a user message (the query)", param="messages")
    else:
        query = texts[last_user][1]
        before = texts[:last_user]
    if options.context is not None:
        context = options.context
    elif not before:
        # One user message and nothing else: it is the context, and the root responds to it.
        return ChatRequest(
            model=model,
            context=ContextSpec(inline=query),
            query=RESPOND_PROMPT,
            stream=stream,
            include_usage=include_usage,
            options=options,
        )
    elif len(before) == 1:
        context = ContextSpec(inline=before[0][1])
    else:
        context = ContextSpec(inline=[text for _, text in before])
    return ChatRequest(
        model=model, context=context, query=query, stream=stream, include_usage=include_usage, options=options
    )


def new_completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def completion_body(
    *, completion_id: str, model: str, answer: str, usage: dict[str, Any], rlm: dict[str, Any]
) -> dict[str, Any]:
    """A `chat.completion` object. `finish_reason` is "stop" for a run that ended with an
    answer and "length" for one that ended early (budget, deadline, iterations): the answer
    may be incomplete, as with a reply cut at max_tokens."""
    finish = "stop" if rlm.get("status") == "ok" else "length"
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer, "refusal": None},
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
        "usage": usage,
        "rlm": rlm,
    }


def chunk(
    *,
    completion_id: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
    rlm: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta=None` gives the usage-only chunk (no choices)
    that OpenAI sends last when asked for `stream_options.include_usage`."""
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage is not None:
        body["usage"] = usage
    if rlm is not None:
        body["rlm"] = rlm
    return body


def split_answer(answer: str, size: int = 256) -> list[str]:
    """The answer as content deltas (the run is over: no token stream to relay)."""
    return [answer[i : i + size] for i in range(0, len(answer), size)] or [""]
