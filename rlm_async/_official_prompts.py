"""The official package's message formats, for `RLM(custom_system_prompt=...)`.

A model fine-tuned on the official `rlms` package's trajectories expects its exact
messages: the system prompt with `{custom_tools_section}` filled in and the orchestrator
addendum after it, the metadata message ("Answer the following: ..."), an optional user
prologue, a "Turn i/N:" user message before every root call, and each turn's code output
as one "REPL output:" message. When a user passes `custom_system_prompt`, rlm_async writes
exactly these (checked on the wire against the official package 0.1.3 by
`tests/test_official_prompts.py`); its own default prompt stays its own (`_prompts`).

The orchestrator addendum is the official package's text (MIT licensed; see
`prompts/official_orchestrator.LICENSE.txt`), kept verbatim in package data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from ._context import Context
from ._tools import ToolSet
from .exceptions import ConfigError
from .sandbox import CellResult

__all__ = [
    "FINAL_ASK",
    "OfficialPrompt",
    "metadata_message",
    "observation",
    "system_message",
    "turn_message",
]

FINAL_ASK = "Please provide a final answer to the user's question based on the information provided."
"""What the official package appends (as an assistant message) when iterations run out."""

_SAFEGUARD = (
    "You have not interacted with the REPL environment or seen your prompt / context "
    "yet. Look at the context first; do not provide a final answer yet.\n\n"
)


@cache
def _orchestrator_addendum() -> str:
    return (
        resources.files("rlm_async.prompts").joinpath("official_orchestrator.txt").read_text(encoding="utf-8")
    )


@dataclass(frozen=True, kw_only=True)
class OfficialPrompt:
    """A system prompt used the official package's way, with its message formats."""

    template: str
    """The prompt text. As in the official package it goes through `str.format`:
    `{custom_tools_section}` becomes the tools' list, and literal braces are written `{{` `}}`."""
    orchestrator: bool = True
    """Append the official orchestrator addendum (the official `orchestrator=True`)."""

    def __post_init__(self) -> None:
        try:
            self.template.format(custom_tools_section="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"custom_system_prompt cannot be formatted ({type(exc).__name__}: {exc}): as in the "
                "official package, it goes through str.format with only {custom_tools_section}; "
                "write literal braces as {{ and }}"
            ) from None


def system_message(prompt: OfficialPrompt, tools: ToolSet) -> str:
    text = prompt.template.format(custom_tools_section=tools.official_section())
    return f"{text}\n\n{_orchestrator_addendum()}" if prompt.orchestrator else text


def _lengths(context: Context) -> tuple[str, list[int]]:
    """The official `QueryMetadata`: the context's type and the lengths it reports."""
    if isinstance(context, str):
        return "str", [len(context)]
    if isinstance(context, dict):
        return "dict", [_json_len_or_str(v) for v in context.values()]
    items: list[Any] = list(context)
    if not items:
        return "list", [0]
    first = items[0]
    if isinstance(first, dict):
        if "content" in first:
            return "list", [len(str(c.get("content", ""))) for c in items]
        return "list", [_json_len(c) for c in items]
    return "list", [len(c) for c in items]


def _json_len(value: Any) -> int:
    try:
        return len(json.dumps(value, default=str))
    except Exception:
        return len(repr(value))


def _json_len_or_str(value: Any) -> int:
    return len(value) if isinstance(value, str) else _json_len(value)


def metadata_message(context: Context, root_prompt: str | None) -> str:
    kind, lengths = _lengths(context)
    body = (
        f"Your context is a {kind} of {sum(lengths)} total characters. "
        "Each sub-LLM call can handle roughly ~100k tokens at once."
    )
    return f"Answer the following: {root_prompt}\n\n{body}" if root_prompt else body


def turn_message(
    iteration: int, max_iterations: int, *, context_count: int = 1, history_count: int = 0
) -> str:
    """The user message before root call `iteration` (from 0)."""
    text = f"Turn {iteration + 1}/{max_iterations}:"
    if iteration == 0:
        text = _SAFEGUARD + text
    if context_count > 1:
        text += (
            f"\n\nNote: You have {context_count} contexts available "
            f"(context_0 through context_{context_count - 1})."
        )
    if history_count == 1:
        text += "\n\nNote: You have 1 prior conversation history available in the `history` variable."
    elif history_count > 1:
        text += (
            f"\n\nNote: You have {history_count} prior conversation histories available "
            f"(history_0 through history_{history_count - 1})."
        )
    return text


def _stderr(result: CellResult) -> str:
    """The official REPL's stderr: what the code wrote, then `\\nType: message` if it raised."""
    if not result.error:
        return result.stderr
    lines = [line for line in result.error.strip().splitlines() if line.strip()]
    # A raised exception's last traceback line is "Type: message"; any other end of a cell
    # (timeout, crash) is rlm_async's own one-paragraph message.
    said = lines[-1] if result.status == "error" and lines else result.error.strip()
    return f"{result.stderr}\n{said}"


def _block(result: CellResult) -> str:
    parts = []
    if result.stdout:
        parts.append(f"\n{result.stdout}")
    stderr = _stderr(result)
    if stderr:
        parts.append(f"\n{stderr}")
    if result.variables:
        parts.append(f"REPL variables: {list(result.variables)}\n")
    return "\n\n".join(parts) if parts else "No output"


def observation(results: Sequence[CellResult], limit: int) -> str | None:
    """The user message after a turn's code ran, or `None` when the reply had no code."""
    if not results:
        return None
    parts = []
    multi = len(results) > 1
    for i, result in enumerate(results, start=1):
        text = _block(result)
        if len(text) > limit:
            text = text[:limit] + f"... + [{len(text) - limit} chars...]"
        parts.append(f"{'REPL output (block ' + str(i) + '):' if multi else 'REPL output:'}\n{text}")
    return "\n\n".join(parts)
