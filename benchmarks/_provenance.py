"""Where a benchmark result came from: the command that made it, when, and on what machine.

Shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this module sits on
their import path) so every results file opens with the same header."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from typing import Any


def provenance(script: str, argv: Sequence[str] | None = None, **machine: Any) -> dict[str, Any]:
    """`command`, `created` and `machine` entries for a results file; `machine` extras (a
    load average, a note) are added to the machine description."""
    args = list(argv) if argv is not None else sys.argv[1:]
    return {
        "command": f".venv/bin/python benchmarks/{script} {shlex.join(args)}".rstrip(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            **machine,
        },
    }
