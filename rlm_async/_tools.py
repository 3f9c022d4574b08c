"""Custom tools: host functions and plain values the model's code reaches by name.

`RLM(custom_tools={...})` takes the official package's forms — a value, or
`{"tool": value, "description": "..."}` — and `Tool(fn, description=, max_concurrency=)`.
A callable stays on the host: the sandbox gets only its name and docstring, its calls come
back over the control channel and run in the engine (`_engine/tools.py`). A plain value
is JSON data copied into the REPL as a variable.

This module checks the entries once, where they enter, and writes how they appear in a
system prompt: exactly as the official package writes its `{custom_tools_section}`, or
with signatures and docstrings in rlm_async's own prompt.
"""

from __future__ import annotations

import inspect
import json
import keyword
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .exceptions import ConfigError
from .sandbox import REPL_NAMES, ReplSetup

__all__ = ["Tool", "ToolEntry", "ToolSet", "parse_tools"]

_SESSION_NAMES = re.compile(r"^(context|history)(_\d+)?$")
"""`context_N` / `history_N`: the official package's per-call variables."""
_DOC_CHARS = 600


@dataclass(frozen=True, slots=True)
class Tool:
    """A host function for `custom_tools` with what the official dict form cannot say.

        RLM(..., custom_tools={"search": Tool(search, max_concurrency=4)})

    `description` is what the system prompt says of it (default: its docstring's first
    paragraph); `max_concurrency` caps the calls of it running at once in this RLM (all
    queries together; `None`: no cap of its own)."""

    fn: Callable[..., Any]
    description: str | None = None
    max_concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class ToolEntry:
    """One checked entry: a callable (runs on the host) or a plain JSON value."""

    name: str
    value: Any = field(hash=False)
    description: str | None = None
    """As given (the official dict form's "description", or `Tool.description`)."""
    max_concurrency: int | None = None

    @property
    def is_function(self) -> bool:
        return callable(self.value)

    def docstring(self) -> str:
        """The description, else the first paragraph of the function's docstring."""
        if self.description:
            return self.description
        if not self.is_function:
            return ""
        doc = inspect.getdoc(self.value) or ""
        return doc.split("\n\n", 1)[0].strip()[:_DOC_CHARS]


@dataclass(frozen=True, slots=True)
class ToolSet:
    """The checked `custom_tools` (or `custom_sub_tools`) of one RLM, in the order given."""

    entries: tuple[ToolEntry, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.entries)

    def function(self, name: str) -> ToolEntry | None:
        for entry in self.entries:
            if entry.name == name and entry.is_function:
                return entry
        return None

    def repl_setup(self, *, list_variables: bool = False) -> ReplSetup:
        """What the worker gets: names and docstrings of the functions, values as JSON."""
        values = {e.name: e.value for e in self.entries if not e.is_function}
        return ReplSetup(
            tools=tuple((e.name, e.docstring()) for e in self.entries if e.is_function),
            values_json=json.dumps(values, ensure_ascii=False) if values else "",
            list_variables=list_variables,
        )

    def official_section(self) -> str:
        """`{custom_tools_section}` exactly as the official package (0.1.3) fills it."""
        if not self.entries:
            return ""
        lines = []
        for e in self.entries:
            if e.description:
                lines.append(f"- `{e.name}`: {e.description}")
            elif e.is_function:
                lines.append(f"- `{e.name}`: A custom function")
            else:
                lines.append(f"- `{e.name}`: A custom {type(e.value).__name__} value")
        return "\n6. Custom tools and data available in the REPL:\n" + "\n".join(lines)

    def prompt_section(self) -> str:
        """The tools in rlm_async's own root prompt: signatures and docstrings."""
        if not self.entries:
            return ""
        lines = [
            "",
            "",
            "Custom tools in the REPL. Functions run on the host: pass and expect JSON data (str, "
            "int, float, bool, None, lists, dicts with str keys); a failure raises `ToolError`.",
        ]
        for e in self.entries:
            if e.is_function:
                lines.append(
                    f"- `{e.name}{_signature(e.value)}`" + (f": {e.docstring()}" if e.docstring() else "")
                )
            else:
                lines.append(
                    f"- `{e.name}`: " + (e.description or f"a value of type {type(e.value).__name__}")
                )
        return "\n".join(lines)


def _signature(fn: Callable[..., Any]) -> str:
    try:
        try:  # annotations as written, also under `from __future__ import annotations`
            return str(inspect.signature(fn, eval_str=True))
        except Exception:  # an annotation that does not evaluate: keep it as text
            return str(inspect.signature(fn))
    except (TypeError, ValueError):  # some builtins have none
        return "(...)"


def parse_tools(tools: Mapping[str, Any] | None, where: str = "custom_tools") -> ToolSet:
    """Check `custom_tools` where it enters; a bad entry is a `ConfigError` naming it and the fix."""
    if tools is None:
        return ToolSet()
    if not isinstance(tools, Mapping):
        raise ConfigError(f"{where} must be a dict of name -> function or value, not {type(tools).__name__}")
    return ToolSet(tuple(_entry(name, value, where) for name, value in tools.items()))


def _entry(name: object, raw: Any, where: str) -> ToolEntry:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ConfigError(f"{where}: {name!r} is not a valid Python name; the code calls a tool by its name")
    if name in REPL_NAMES or _SESSION_NAMES.match(name) or name.startswith("_"):
        raise ConfigError(
            f"{where}: {name!r} is reserved in the REPL (its helpers, `context`/`history` and "
            "names starting with '_'); rename the tool"
        )
    description: Any = None
    limit: Any = None
    value: Any = raw
    if isinstance(raw, Tool):
        value, description, limit = raw.fn, raw.description, raw.max_concurrency
    elif isinstance(raw, Mapping) and "tool" in raw:  # the official dict form
        unknown = set(raw) - {"tool", "description", "max_concurrency"}
        if unknown:
            raise ConfigError(
                f"{where}[{name!r}] has unknown key(s) {sorted(unknown)}; use tool, description, max_concurrency"
            )
        value, description, limit = raw["tool"], raw.get("description"), raw.get("max_concurrency")
        if description is not None and not isinstance(description, str):
            description = None  # as the official package: a non-str description is dropped
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigError(f"{where}[{name!r}]: max_concurrency is {limit!r}; use an int >= 1, or None")
    if not callable(value):
        if limit is not None:
            raise ConfigError(f"{where}[{name!r}]: max_concurrency applies to functions, not to a value")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"{where}[{name!r}] is a {type(value).__name__} value that cannot cross into the sandbox "
                f"({exc}): plain values must be JSON data (str, int, float, bool, None, lists, dicts "
                "with str keys); to keep it on the host, wrap it in a function"
            ) from None
    return ToolEntry(name=name, value=value, description=description, max_concurrency=limit)
