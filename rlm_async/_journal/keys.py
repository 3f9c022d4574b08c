"""Journal keys: what identifies a call (what was asked, not where it was sent), and how a
completion is stored."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from typing import Any

from .._text import scrub
from .._types import Completion, Message, ModelRequest, Usage

__all__ = ["budget_note", "decode_completion", "encode_completion", "greedy", "occurrence_key", "request_key"]

_KEY_SCHEME = "rlm_async.journal.key/v2"
"""Hashed into every key, so a change to how keys are built can never collide with old rows.
v1 also hashed the endpoint URL; v2 leaves it out and numbers sampled calls' occurrences."""

_NOT_OUTPUT_AFFECTING = frozenset({"prompt_cache_key"})
"""`ModelRequest` fields that do not change the answer and so stay out of the key. Every
other field is in the key, including fields added to `ModelRequest` later."""


_BUDGET_NOTE = re.compile(r"^\[budget left: [^\n]*\]$", re.MULTILINE)


def budget_note(left: str) -> str:
    """The line that tells the root model what budget is left, as the engine writes it.

    Its figures differ from run to run (a batch's queries share one budget, and finish in
    a different order when resumed), so journal keys leave the line out: otherwise a
    resumed query's later root turns would miss the journal and be paid for twice. The
    rest of the prompt still decides the key, so the model's answer to it is the same
    answer the first run paid for."""
    return f"[budget left: {left}]"


def request_key(request: ModelRequest) -> str:
    """See `Journal.key`. Fields that are `None` are left out, so adding an optional field
    to `ModelRequest` does not change the keys of existing rows."""
    body: dict[str, Any] = {"scheme": _KEY_SCHEME}
    for f in dataclasses.fields(request):
        if f.name in _NOT_OUTPUT_AFFECTING:
            continue
        value = getattr(request, f.name)
        if value is not None:
            body[f.name] = _canonical(value, f.name)
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def occurrence_key(key: str, n: int) -> str:
    """The row key of the `n`-th (from 1) identical sampled call with request key `key`."""
    return hashlib.sha256(f"{key}#{n}".encode("ascii")).hexdigest()


def greedy(request: ModelRequest) -> bool:
    """Greedy decoding: one answer however often it is asked."""
    return request.temperature == 0


def _canonical(value: Any, where: str) -> Any:
    """A JSON value that is equal exactly when the request means the same thing."""
    if isinstance(value, Message):
        content = value.content
        if value.role == "user" and "[budget left: " in content:
            content = _BUDGET_NOTE.sub("", content)
        return [value.role, content]
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        # temperature=0 and temperature=0.0 are the same request; repr() of a float is the
        # shortest round-trip form, identical on every platform.
        return int(value) if value.is_integer() else value if math.isfinite(value) else repr(value)
    if isinstance(value, (tuple, list)):
        return [_canonical(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v, where) for k, v in value.items()}
    raise TypeError(
        f"ModelRequest.{where} has a value of type {type(value).__name__} that the journal key "
        "cannot encode; extend rlm_async._journal._canonical for it"
    )


# -- completions as stored ------------------------------------------------------------------


def encode_completion(c: Completion) -> str:
    return json.dumps(
        {
            "text": scrub(c.text),  # sqlite cannot store a lone surrogate
            "model": c.model,
            "finish_reason": c.finish_reason,
            "usage": [c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.cached_tokens],
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


def decode_completion(raw: str) -> Completion:
    d = json.loads(raw)
    prompt, completion, cached = (int(n) for n in d["usage"])
    finish = d["finish_reason"]
    if not isinstance(d["text"], str) or not isinstance(d["model"], str):
        raise TypeError("text and model must be strings")
    return Completion(
        text=d["text"],
        usage=Usage(prompt, completion, cached),
        model=d["model"],
        finish_reason=None if finish is None else str(finish),
    )


# -- single-flight ------------------------------------------------------------------------
