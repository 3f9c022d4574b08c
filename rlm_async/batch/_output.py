"""The output file: JSONL rows appended one at a time and fsynced, so a crash loses at most
the row being written; read back on the next run to resume.

On open, an existing file is checked:

* a last line cut short by a crash (no newline, or not valid JSON) is cut off, and the file
  fsynced, before anything is appended;
* rows whose status is final index the items to skip; a `not_started` row (the budget ran
  out) is not final, so its item runs again; a later row for an id replaces an earlier one;
* if anything was dropped or replaced, the file is rewritten with one row per id (to a
  temporary file, fsynced, renamed over the old one), so the output keeps exactly one row
  per input.

A line in the middle that is not a row means the file is not ours (or was edited): that
raises `BatchOutputError` naming the line rather than guessing. Blocking I/O: call the
methods from a worker thread inside an event loop (the runner does).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..exceptions import RLMError
from ._rows import BatchRow

__all__ = ["BatchOutputError", "OutputFile", "Resumed"]


class BatchOutputError(RLMError):
    """The output file cannot be resumed from (not a batch output, or unreadable)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Resumed:
    """What `OutputFile.open` found in an existing file."""

    kept: int
    """Final rows kept: their items are skipped."""
    repaired_tail: bool
    """A truncated last line was cut off."""
    dropped: int
    """Rows dropped as not final (`not_started`) or replaced by a later row of the same id."""


class OutputFile:
    """Append-only JSONL rows, fsynced per row, with a resume index."""

    def __init__(self, path: Path, rows: dict[str, BatchRow], resumed: Resumed, f: IO[bytes]) -> None:
        self.path = path
        self.rows = rows
        """Final rows by key: those kept from earlier runs and those appended since."""
        self.resumed = resumed
        self._f = f

    @classmethod
    def open(cls, path: Path) -> OutputFile:
        """Open (creating or resuming) the output at `path`."""
        path = Path(path)
        rows: dict[str, BatchRow] = {}
        repaired = False
        dropped = 0
        if path.exists():
            data = path.read_bytes()
            good_end, parsed = _parse(path, data)
            if good_end < len(data):
                repaired = True
                with path.open("r+b") as torn:
                    torn.truncate(good_end)
                    torn.flush()
                    os.fsync(torn.fileno())
            for row in parsed:
                if row.key in rows:
                    dropped += 1
                rows[row.key] = row
            final = {k: r for k, r in rows.items() if r.final}
            dropped += len(rows) - len(final)
            rows = final
            if dropped:
                _rewrite(path, list(rows.values()))
        f = path.open("ab")
        _fsync_dir(path.parent)
        return cls(path, rows, Resumed(kept=len(rows), repaired_tail=repaired, dropped=dropped), f)

    def done(self, key: str) -> bool:
        return key in self.rows

    def append(self, row: BatchRow) -> None:
        """Write one row and fsync it: when this returns, the row survives a crash."""
        line = json.dumps(row.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n"
        self._f.write(line.encode("utf-8"))
        self._f.flush()
        os.fsync(self._f.fileno())
        if row.final:
            self.rows[row.key] = row

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse(path: Path, data: bytes) -> tuple[int, list[BatchRow]]:
    """Rows of `data`, and the offset where the good part ends (a torn last line excluded)."""
    rows: list[BatchRow] = []
    pos, n = 0, 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl
        n += 1
        raw = data[pos:end]
        last = nl < 0 or data[nl + 1 :].strip() == b""
        try:
            obj = json.loads(raw) if raw.strip() else None
            row = BatchRow.from_dict(obj) if isinstance(obj, dict) else None
        except (ValueError, TypeError):
            row = None
        if nl < 0 or (row is None and raw.strip()):
            if last:
                return pos, rows  # torn by a crash: cut from here
            raise BatchOutputError(
                f"{path} line {n} is not a batch output row; pass another --out, or fix or delete the file"
            )
        if row is not None:
            rows.append(row)
        pos = nl + 1
    return pos, rows


def _rewrite(path: Path, rows: list[BatchRow]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        for row in rows:
            f.write(
                (json.dumps(row.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
            )
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
