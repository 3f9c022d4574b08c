"""Input: one query per JSONL line or CSV row, checked once here, where data enters.

A good line becomes a `BatchItem`; a bad one an `InvalidItem` naming the line and the
problem, which the runner turns into an output row: bad input never stops a batch.

    {"id": "q1", "query": "How many invoices?", "context": "..."}
    {"id": "q2", "query": "Who signed?", "context_file": "docs/treaty.txt"}

`context` is any context `RLM.acompletion` accepts (a string, a list of strings, a dict of
JSON data); `context_file` is a path, relative to the input file's folder, read as UTF-8
text (a `.json` file is parsed). An item without an `id` takes its line number. Contexts
in files are read when their query starts, not when the input is read, so a batch of large
documents holds only the running ones in memory.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._context import Context, validate_context
from ..exceptions import ContextTypeError

__all__ = [
    "DEFAULT_MAX_CONTEXT_CHARS",
    "BatchItem",
    "InputProblem",
    "InvalidItem",
    "ItemChecker",
    "count_inputs",
    "read_items",
]

DEFAULT_MAX_CONTEXT_CHARS = 100_000_000
"""Contexts above this many characters (for a file: bytes) are refused as oversized."""

ItemId = str | int


class InputProblem(Exception):
    """An item that cannot run, e.g. its context file vanished or is not UTF-8."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchItem:
    """One query of a batch: an id, the question, and a context inline or in a file."""

    id: ItemId
    query: str
    context: Context | None = None
    context_file: Path | None = None
    line: int | None = None
    """Where it came from: the 1-based line of a JSONL file, the row of a CSV file, or the
    1-based position in a Python iterable."""
    max_context_chars: int = DEFAULT_MAX_CONTEXT_CHARS

    @property
    def key(self) -> str:
        """What identifies the item across runs (resume): its id."""
        return item_key(self.id)

    def context_chars(self) -> int:
        """The context's size for the budget estimate, without reading a file; raises
        `InputProblem` for a file that is missing, unreadable or oversized."""
        if self.context_file is not None:
            return _file_size(self.context_file, self.max_context_chars)
        return _context_chars(self.context)

    def load_context(self) -> Context:
        """The context, read from its file if it has one; raises `InputProblem`."""
        if self.context_file is None:
            assert self.context is not None
            return self.context
        return _read_context_file(self.context_file, self.max_context_chars)


@dataclass(frozen=True, slots=True, kw_only=True)
class InvalidItem:
    """An input that could not become a `BatchItem`; the runner writes it as a row."""

    line: int | None
    id: ItemId | None
    problem: str

    @property
    def key(self) -> str:
        return item_key(self.id) if self.id is not None else f"#line{self.line}"


def item_key(item_id: ItemId) -> str:
    return str(item_id)


class ItemChecker:
    """Turns raw records into items: required fields, types, sizes, duplicate ids.

    One per batch (it remembers ids, to refuse a duplicate)."""

    def __init__(self, *, base_dir: Path | None = None, max_context_chars: int = DEFAULT_MAX_CONTEXT_CHARS):
        self._base = base_dir
        self._max = max_context_chars
        self._seen: dict[str, int | None] = {}

    def check(self, data: object, line: int | None) -> BatchItem | InvalidItem:
        where = f"line {line}" if line is not None else "item"
        if isinstance(data, BatchItem):
            return self._unique(data)
        if not isinstance(data, Mapping):
            return InvalidItem(
                line=line, id=None, problem=f"{where}: expected an object, got {type(data).__name__}"
            )
        raw_id = data.get("id", line)
        item_id: ItemId | None = (
            raw_id if isinstance(raw_id, str | int) and not isinstance(raw_id, bool) else None
        )
        if item_id is None or item_id == "":
            return InvalidItem(
                line=line, id=None, problem=f"{where}: 'id' must be a string or an integer, got {raw_id!r}"
            )

        def bad(problem: str) -> InvalidItem:
            return InvalidItem(line=line, id=item_id, problem=f"{where}: {problem}")

        unknown = sorted(set(data) - {"id", "query", "context", "context_file"})
        if unknown:
            return bad(f"unknown field(s) {unknown}; use id, query, and context or context_file")
        query = data.get("query")
        if not isinstance(query, str) or not query.strip():
            return bad(f"'query' must be a non-empty string, got {_short(query)}")
        has_context = data.get("context") is not None
        has_file = data.get("context_file") not in (None, "")
        if has_context == has_file:
            return bad("give exactly one of 'context' and 'context_file'")
        if has_file:
            name = data["context_file"]
            if not isinstance(name, str):
                return bad(f"'context_file' must be a path string, got {_short(name)}")
            path = Path(name)
            if not path.is_absolute() and self._base is not None:
                path = self._base / path
            item = BatchItem(
                id=item_id, query=query, context_file=path, line=line, max_context_chars=self._max
            )
        else:
            try:
                context = validate_context(data["context"])
            except ContextTypeError as exc:
                return bad(str(exc))
            size = _context_chars(context)
            if size > self._max:
                return bad(f"context has {size:,} characters, over the limit of {self._max:,}")
            item = BatchItem(id=item_id, query=query, context=context, line=line, max_context_chars=self._max)
        return self._unique(item)

    def _unique(self, item: BatchItem) -> BatchItem | InvalidItem:
        first = self._seen.get(item.key, -1)
        if first != -1:
            at = f" (first on line {first})" if first is not None else ""
            where = f"line {item.line}" if item.line is not None else "item"
            # A duplicate's row would be indistinguishable from the first one's: no id.
            return InvalidItem(line=item.line, id=None, problem=f"{where}: duplicate id {item.id!r}{at}")
        self._seen[item.key] = item.line
        return item


def read_items(
    path: Path, *, max_context_chars: int = DEFAULT_MAX_CONTEXT_CHARS
) -> Iterator[BatchItem | InvalidItem]:
    """Items of a `.jsonl` (or `.json` lines) or `.csv` file, lazily, line by line."""
    checker = ItemChecker(base_dir=path.parent, max_context_chars=max_context_chars)
    if path.suffix.lower() == ".csv":
        yield from _read_csv(path, checker)
        return
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                data = json.loads(raw)
            except UnicodeDecodeError as exc:
                yield InvalidItem(line=n, id=None, problem=f"line {n}: not UTF-8 ({exc.reason})")
                continue
            except json.JSONDecodeError as exc:
                yield InvalidItem(
                    line=n, id=None, problem=f"line {n}: not valid JSON ({exc.msg} at column {exc.colno})"
                )
                continue
            yield checker.check(data, n)


def _read_csv(path: Path, checker: ItemChecker) -> Iterator[BatchItem | InvalidItem]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or ())
        if "query" not in fields:
            yield InvalidItem(
                line=1, id=None, problem=f"line 1: the CSV header {sorted(fields)} has no 'query' column"
            )
            return
        for record in reader:  # ids stay strings: "007" is not 7
            line = reader.line_num
            data: dict[str, Any] = {k: v for k, v in record.items() if k is not None and v not in (None, "")}
            if None in record:
                yield InvalidItem(line=line, id=None, problem=f"line {line}: more fields than the header has")
                continue
            yield checker.check(data, line)


def count_inputs(path: Path) -> int:
    """How many inputs `read_items` will yield (for progress), without parsing them."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8", errors="replace") as f:
            return max(0, sum(1 for _ in csv.reader(f)) - 1)
    with path.open("rb") as f:
        return sum(1 for raw in f if raw.strip())


def _file_size(path: Path, max_chars: int) -> int:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InputProblem(f"context file {path} does not exist") from None
    except OSError as exc:
        raise InputProblem(f"context file {path} cannot be read: {exc.strerror}") from None
    if path.is_dir():
        raise InputProblem(f"context file {path} is a directory")
    if size > max_chars:
        raise InputProblem(f"context file {path} has {size:,} bytes, over the limit of {max_chars:,}")
    return size


def _read_context_file(path: Path, max_chars: int) -> Context:
    _file_size(path, max_chars)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputProblem(
            f"context file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except OSError as exc:
        raise InputProblem(f"context file {path} cannot be read: {exc.strerror}") from None
    if path.suffix.lower() != ".json":
        return text
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputProblem(
            f"context file {path} is not valid JSON ({exc.msg} at line {exc.lineno})"
        ) from None
    try:
        return validate_context(data)
    except ContextTypeError as exc:
        raise InputProblem(f"context file {path}: {exc}") from None


def _context_chars(context: Context | None) -> int:
    if context is None:
        return 0
    if isinstance(context, str):
        return len(context)
    if isinstance(context, list):
        return sum(len(s) for s in context)
    return len(json.dumps(context, ensure_ascii=False))


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
