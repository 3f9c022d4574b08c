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
    "COMPACTION_REQUEST",
    "ContextMetadata",
    "compaction_resume",
    "compaction_system_note",
    "describe_context",
    "first_user_message",
    "root_system_prompt",
    "session_note",
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


def session_note(*, index: int, contexts: int, histories: int, compaction: bool) -> str:
    """What a call of a persistent session adds to its first user message: where this call's
    context is, and what earlier calls left (the official package's variables)."""
    lines = [f"This call's context is `context_{index}`."]
    if contexts > 1:
        lines.append(
            f"You have {contexts} contexts available (context_0 through context_{contexts - 1}); "
            "`context` is `context_0`. Variables you created in earlier calls are still defined."
        )
    if histories == 1:
        alias = "" if compaction else " (also `history`)"
        lines.append(f"You have 1 prior conversation history available in `history_0`{alias}.")
    elif histories > 1:
        lines.append(
            f"You have {histories} prior conversation histories available "
            f"(history_0 through history_{histories - 1})."
        )
    return "\n".join(lines)


def compaction_system_note() -> str:
    """Appended to the root system prompt when compaction is on (the official wording)."""
    return (
        "\n\nThe full conversation history (trajectory segments and any summaries) "
        "is available in the REPL variable `history` as a list."
    )


COMPACTION_REQUEST = (
    "Summarize your progress so far. Include:\n"
    "1. Which steps/sub-tasks you have completed and which remain.\n"
    "2. Any concrete intermediate results (numbers, values, variable names) "
    "you computed — preserve these exactly.\n"
    "3. What your next action should be.\n"
    "Be concise (1–3 paragraphs) but preserve all key results and your "
    "current position in the task."
)
"""The user message that asks the root model to summarise its conversation (official wording)."""


def compaction_resume(count: int) -> str:
    """The user message after a summary: go on from it (official wording)."""
    return (
        f"Your conversation has been compacted {count} time(s). "
        "Continue from the above summary. Do NOT repeat work you have already "
        "completed. Use SHOW_VARS() to check which REPL variables exist, "
        "and check `history` for full context. "
        "Your next action:"
    )
