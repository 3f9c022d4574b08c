"""The spend log: the batch ledger's books on disk, so a rerun counts what earlier runs paid.

The output's rows say what *finished* queries cost. A crash (or `kill -9`) also cuts off
queries that were running: the calls they completed were paid (a rerun replays them from the
journal for free, so no row of the rerun carries their cost), and calls that were in flight
may have been billed too. The spend log closes that gap: the batch ledger (`BudgetLedger`
with this as its `LedgerLog`) writes every reservation *before* its call can be sent and
every settlement after, so at the next start

    carried = what settlements spent + what reservations still held at the crash

counts every call an earlier run made: settled ones at their price, unsettled ones (in
flight at the crash) at their reserved upper bound. A resumed batch lowers its cap by that.

One JSON object a line, written with one `write()` each on an `O_APPEND` descriptor: a
record that `write()` returned survives the process being killed. Not fsynced per call (that
would cost a disk flush per model call on the event loop), so after a power cut or OS
crash the last records may be lost; the caller therefore takes the larger of this and the
kept rows' cost, and the rows are fsynced. On open, the records are summed into one
`carried` record (written to a temporary file, fsynced, renamed over the log), so the file
stays one line per call of the current run. A torn last line is a record whose `write()`
never returned, so its reservation never completed and nothing was sent under it: it is
dropped. Blocking I/O, but small: a few microseconds a record.
"""

from __future__ import annotations

import json
import os
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import structlog

from .._governor import Charge
from .._types import Usage
from ._output import BatchOutputError

__all__ = ["SpendLog", "spend_log_path"]

_log = structlog.get_logger("rlm_async.batch")


def spend_log_path(output: Path) -> Path:
    """Where the spend log of the batch writing `output` lives: beside it, `<name>.spend`."""
    return output.with_name(output.name + ".spend")


def _to_json(c: Charge) -> dict[str, Any]:
    u = c.usage
    return {
        "usd": str(c.usd),
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "cached_tokens": u.cached_tokens,
        "calls": u.calls,
    }


def _from_json(d: Any) -> Charge:
    if not isinstance(d, dict):
        raise TypeError("a charge is an object")
    usage = Usage(
        int(d["prompt_tokens"]), int(d["completion_tokens"]), int(d["cached_tokens"]), calls=int(d["calls"])
    )
    return Charge(usage, Decimal(str(d["usd"])))


class SpendLog:
    """A `LedgerLog` appending to a file; `carried` is what earlier runs committed."""

    def __init__(self, path: Path, carried: Charge, fd: int) -> None:
        self.path = path
        self.carried = carried
        """What earlier runs of this batch spent, plus what their unsettled reservations
        held when they stopped (calls in flight at a crash, at their upper bound)."""
        self._fd: int | None = fd
        self._broken: OSError | None = None

    @classmethod
    def open(cls, path: Path, *, fresh: bool) -> SpendLog:
        """Open the log at `path`; `fresh`: a new batch (no output yet), so any old log
        there belongs to an earlier batch and is discarded."""
        path = Path(path)
        carried = Charge()
        if not fresh and path.exists():
            carried = _replay(path, path.read_bytes())
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as f:
            if carried != Charge():
                f.write(_line({"carried": _to_json(carried)}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        return cls(path, carried, fd)

    # -- LedgerLog --------------------------------------------------------------------
    def reserved(self, charge: Charge) -> None:
        """Write the reservation before its call can be sent; raise (the call is then not
        sent) if it cannot be written: spending what cannot be recorded could cross the cap
        of a rerun."""
        if self._broken is not None:
            raise BatchOutputError(
                f"cannot write the spend log {self.path} ({self._broken}); free disk space or "
                "fix its permissions, then rerun to resume"
            )
        try:
            self._write({"reserve": _to_json(charge)})
        except OSError as exc:
            self._broken = exc
            raise BatchOutputError(
                f"cannot write the spend log {self.path} ({exc}); free disk space or fix its "
                "permissions, then rerun to resume"
            ) from exc

    def settled(self, held: Charge, spent: Charge) -> None:
        """Write the settlement. Never raises (the ledger is mid-update): a settlement that
        cannot be written leaves its reservation counted at the upper bound, which only
        over-counts, and stops further reservations."""
        try:
            self._write({"settle": _to_json(held), "spent": _to_json(spent)})
        except OSError as exc:
            self._broken = exc
            _log.warning("cannot write the spend log; no more calls will be sent", path=str(self.path))

    # -- file -------------------------------------------------------------------------
    def _write(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            raise OSError("the spend log is closed")
        os.write(self._fd, _line(record))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SpendLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")


def _replay(path: Path, data: bytes) -> Charge:
    """`carried` of an existing log: settled spend plus reservations never settled."""
    spent, held = Charge(), Charge()
    lines = data.split(b"\n")
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            if "carried" in record:
                spent += _from_json(record["carried"])
            elif "reserve" in record:
                held += _from_json(record["reserve"])
            else:
                held -= _from_json(record["settle"])
                spent += _from_json(record["spent"])
        except (ValueError, TypeError, KeyError, InvalidOperation) as exc:
            if n == len(lines):  # torn by a crash: its write never returned, nothing was sent
                break
            raise BatchOutputError(
                f"{path} line {n} is not a spend-log record ({exc}); delete the file to resume "
                "without it (the cap then counts only the output's rows)"
            ) from exc
    return spent + held
