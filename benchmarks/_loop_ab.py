"""What `connect.py` and `spawn.py` share: runs of each variant on both event loops, summed
up as one row per (variant, loop) with its median and its runs, printed as a table and
written to a results file that opens with `provenance`."""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from _provenance import provenance

Samples = dict[tuple[str, str], list[float]]
"""Measurements in seconds, by (variant, loop), in the order they were made."""


def median_rows(
    samples: Samples,
    *,
    variant: str,
    figure: str,
    runs: str,
    scale: float,
    digits: int,
    heading: str,
    formats: tuple[str, str],
) -> list[dict[str, Any]]:
    """Print a table (`heading` over the medians, then a line per variant and loop, with
    the median and the runs in `formats`) and return its rows: `{variant: name, "loop":
    loop, figure: median, runs: [...]}`, seconds times `scale`, rounded to `digits`."""
    width = len(heading)
    median_format, run_format = formats
    print(f"{variant:<32} {'loop':<8} {heading:>{width}}   runs")
    rows = []
    for (name, loop), measured in samples.items():
        median = statistics.median(measured) * scale
        rows.append(
            {
                variant: name,
                "loop": loop,
                figure: round(median, digits),
                runs: [round(r * scale, digits) for r in measured],
            }
        )
        shown = ", ".join(f"{r * scale:{run_format}}" for r in measured)
        print(f"{name:<32} {loop:<8} {median:>{width}{median_format}}   {shown}")
    return rows


def write_results(path: Path, benchmark: str, params: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """The results file: the benchmark's name, its parameters, where it came from, its rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = provenance(f"{benchmark}.py", sys.argv[1:], load_avg=os.getloadavg())
    path.write_text(json.dumps({"benchmark": benchmark, **params, **header, "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")
