"""Prompt text: the system prompts (package data) and the messages the engine writes.

Everything built here is deterministic — no ids, timestamps or unsorted containers — so
the prefix of every conversation is byte-identical across calls and runs, which is what
provider prefix caches key on.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from ._context import Context
from ._text import scrub

__all__ = [
    "ContextMetadata",
    "describe_context",
    "first_user_message",
    "root_system_prompt",
    "sub_system_prompt",
]

PREVIEW_CHARS = 500
_MAX_LISTED_LENGTHS = 20


@cache
def _read(name: str) -> str:
    return resources.files("rlm_async.prompts").joinpath(name).read_text(encoding="utf-8")


_AS_COMPLETED = (
    "\n\n`llm_batch_as_completed(prompts, model=None)` is `llm_batch` in completion order: it yields "
    "`(index, answer)` as each sub-call finishes, so you can start combining answers before the "
    "slowest returns. Leaving the loop early (`break`) cancels the sub-calls still running."
)


_HEDGING = (
    "\n\nSlow sub-calls are hedged: one still running when most of its batch has finished gets a "
    "duplicate request, and the first answer is used. Pass `hedge=False` to `llm_query`, `llm_batch` "
    "or `llm_batch_as_completed` when duplicates are not wanted (for example, sampled answers you "
    "count as votes)."
)


def root_system_prompt(*, completion_order: bool = False, hedging: bool = False) -> str:
    """The built-in root prompt; `completion_order` adds `llm_batch_as_completed`, `hedging`
    (the sub-model hedges) the `hedge=False` opt-out."""
    base = _read("root_system.txt")
    return base + (_AS_COMPLETED if completion_order else "") + (_HEDGING if hedging else "")


def sub_system_prompt() -> str:
    return _read("sub_system.txt")


class ContextMetadata:
    """What the root model is told about `context`: type, lengths, a short preview."""

    __slots__ = ("lengths", "preview", "total_length", "type_name")

    def __init__(self, type_name: str, lengths: list[int], preview: str) -> None:
        self.type_name = type_name
        self.lengths = lengths
        self.total_length = sum(lengths)
        # The preview goes into the first prompt: a lone surrogate in it must not break it.
        self.preview = scrub(preview)


def describe_context(context: Context) -> ContextMetadata:
    """Measure a context already checked by `_context.validate_context` (trusted here)."""
    if isinstance(context, str):
        return ContextMetadata("str", [len(context)], context[:PREVIEW_CHARS])
    if isinstance(context, list):
        lengths = [len(item) for item in context]
        preview = context[0][:PREVIEW_CHARS] if context else ""
        return ContextMetadata("list", lengths, preview)
    # dict: lengths of values as text, in insertion order (the order the user gave)
    lengths = [len(v) if isinstance(v, str) else len(repr(v)) for v in context.values()]
    first = next(iter(context.items()), None)
    preview = "" if first is None else f"{first[0]!r}: {str(first[1])[:PREVIEW_CHARS]}"
    return ContextMetadata("dict", lengths, preview)


def _lengths_text(lengths: list[int]) -> str:
    if len(lengths) <= _MAX_LISTED_LENGTHS:
        return str(lengths)
    shown = ", ".join(str(n) for n in lengths[:10])
    return (
        f"[{shown}, ...] ({len(lengths)} items; min {min(lengths)}, "
        f"max {max(lengths)}, mean {sum(lengths) // len(lengths)})"
    )


def first_user_message(meta: ContextMetadata, root_prompt: str | None) -> str:
    # The first sentence keeps the official package's wording, so models and scripted
    # policies written for it parse it unchanged.
    lines = [
        f"Your context is a {meta.type_name} with {meta.total_length} total characters, "
        f"and is broken up into chunks of char lengths: {_lengths_text(meta.lengths)}.",
        "",
        f"A preview of the start of the context ({min(PREVIEW_CHARS, len(meta.preview))} characters):",
        "<<<PREVIEW",
        meta.preview,
        "PREVIEW>>>",
        "",
    ]
    if root_prompt:
        lines += [f"Query: {scrub(root_prompt)}", ""]
    lines.append(
        "Think step by step about how to use the REPL to answer, then write your first ```repl block. "
        "You have not looked at the context yet."
    )
    return "\n".join(lines)
