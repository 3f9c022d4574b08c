"""docs/trace-format.md lists every event kind with its fields: checked here against the
event classes, field by field. Run this file to rewrite the table after changing a class:

    .venv/bin/python tests/test_trace_format_doc.py
"""

from __future__ import annotations

import re
import sys
import typing
from pathlib import Path
from types import NoneType, UnionType

from rlm_async._events import EVENT_TYPES, Event, payload_fields
from rlm_async._trace import FORMAT_VERSION

DOC = Path(__file__).parents[1] / "docs" / "trace-format.md"
BEGIN, END = "<!-- event-table:begin -->", "<!-- event-table:end -->"


def _type_name(annotation: object) -> str:
    if isinstance(annotation, UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if annotation is NoneType:
        return "null"
    assert isinstance(annotation, type)
    return annotation.__name__


def _fields(cls: type[Event]) -> list[tuple[str, str]]:
    hints = typing.get_type_hints(cls)
    return [(name, _type_name(hints[name])) for name in payload_fields(cls)]


def _summary(cls: type[Event]) -> str:
    doc = (cls.__doc__ or "").strip()
    if doc.startswith(cls.__name__ + "("):  # the dataclass's generated signature: no docstring
        return ""
    return " ".join(doc.split(".")[0].split()) + "." if doc else ""


def render_table() -> str:
    rows = ["| kind | class | fields (name: type) | what it says |", "|---|---|---|---|"]
    for kind, cls in EVENT_TYPES.items():
        fields = ", ".join(f"`{name}`: {type_}" for name, type_ in _fields(cls))
        rows.append(f"| `{kind}` | `{cls.__name__}` | {fields} | {_summary(cls)} |")
    return "\n".join(rows)


def _documented() -> str:
    text = DOC.read_text(encoding="utf-8")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip()


class TestTraceFormatDoc:
    def test_every_kind_is_documented_field_by_field(self) -> None:
        """The doc's table names every event kind, and for each its fields, in order, with their types."""
        documented: dict[str, list[tuple[str, str]]] = {}
        for row in _documented().splitlines()[2:]:
            cells = [c.strip() for c in row.strip("|").split("|")]
            kind = cells[0].strip("`")
            documented[kind] = re.findall(r"`(\w+)`: ([\w ]+?)(?:,|$)", cells[2])
        assert list(documented) == list(EVENT_TYPES)
        for kind, cls in EVENT_TYPES.items():
            assert documented[kind] == _fields(cls), kind

    def test_the_table_is_the_generated_one(self) -> None:
        """The table is exactly what this file generates (rerun it after changing a class)."""
        assert _documented() == render_table()

    def test_the_doc_names_the_current_version(self) -> None:
        """The title and the header example carry the version the writer writes."""
        text = DOC.read_text(encoding="utf-8")
        assert f"(version {FORMAT_VERSION})" in text.splitlines()[0]
        assert f'"version":{FORMAT_VERSION},' in text


if __name__ == "__main__":
    text = DOC.read_text(encoding="utf-8")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + render_table() + "\n" + text[end:], encoding="utf-8")
    sys.stdout.write(f"rewrote the event table of {DOC}\n")
