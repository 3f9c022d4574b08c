"""Reading a root model's reply: ```repl blocks to run, and FINAL(...) / FINAL_VAR(...) lines.

Pure functions over text. The protocol is the official `rlms` package's:
- only blocks fenced as ```repl run; ```python and bare ``` blocks are shown, never run;
- a block may sit on one line (```repl print(1)```) or be left unclosed at the end of a reply
  (models cut off by `max_tokens` often do that);
- `FINAL(text)` or `FINAL_VAR(name)` counts only at the start of a line outside code blocks,
  so a model that *talks about* FINAL inside code or prose mid-line does not end the run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["FinalMarker", "find_code_blocks", "find_final", "truncate_output"]

# An opening fence: ``` then an info word, then either a newline or (one-line form) code.
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*(\n|(?=\S))")
_CLOSE = "```"


@dataclass(frozen=True, slots=True)
class _Block:
    lang: str
    code: str
    start: int
    end: int


def _blocks(text: str) -> list[_Block]:
    blocks: list[_Block] = []
    pos = 0
    while True:
        m = _FENCE.search(text, pos)
        if m is None:
            return blocks
        body_start = m.end()
        close = text.find(_CLOSE, body_start)
        end = len(text) if close == -1 else close + len(_CLOSE)
        body = text[body_start : len(text) if close == -1 else close]
        blocks.append(_Block(m.group(1).lower(), body, m.start(), end))
        pos = end


def find_code_blocks(text: str) -> list[str]:
    """The code of every ```repl block, in order. Empty blocks are dropped."""
    return [b.code.strip("\n") for b in _blocks(text) if b.lang == "repl" and b.code.strip()]


def _outside_code(text: str) -> str:
    """The reply with every fenced block blanked out (line structure kept)."""
    parts: list[str] = []
    pos = 0
    for b in _blocks(text):
        parts.append(text[pos : b.start])
        parts.append("\n" * text.count("\n", b.start, b.end))
        pos = b.end
    parts.append(text[pos:])
    return "".join(parts)


@dataclass(frozen=True, slots=True)
class FinalMarker:
    kind: Literal["text", "var"]
    value: str
    """The answer text for FINAL(...), the variable name for FINAL_VAR(...)."""


_FINAL_LINE = re.compile(r"^[ \t]*(FINAL_VAR|FINAL)\(", re.MULTILINE)


def find_final(text: str) -> FinalMarker | None:
    """The first FINAL(...) or FINAL_VAR(...) that starts a line outside code blocks.

    FINAL's text runs to the last closing parenthesis after it (answers contain
    parentheses; a model ending the reply with `FINAL(x)` means all of x). Without any
    closing parenthesis, the rest of the reply is the answer.
    """
    outside = _outside_code(text)
    m = _FINAL_LINE.search(outside)
    if m is None:
        return None
    rest = outside[m.end() :]
    if m.group(1) == "FINAL_VAR":
        close = rest.find(")")
        name = (rest if close == -1 else rest[:close]).strip().strip("\"'` ")
        return FinalMarker("var", name) if name else None
    close = rest.rfind(")")
    value = rest if close == -1 else rest[:close]
    return FinalMarker("text", value.strip())


def truncate_output(text: str, limit: int) -> str:
    """Cut `text` to `limit` characters with a marker saying how much was cut.

    Deterministic, and applied once when an observation is appended to the history, so the
    conversation prefix never changes afterwards (what prefix caches key on).
    """
    if len(text) <= limit:
        return text
    cut = len(text) - limit
    return f"{text[:limit]}\n... [output truncated: {cut} more characters not shown]"
