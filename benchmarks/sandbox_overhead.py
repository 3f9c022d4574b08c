"""Sandbox overhead: what isolation costs per worker and per cell.

    .venv/bin/python benchmarks/sandbox_overhead.py [--repeats 10] [--cells 200]
                                                    [--out benchmarks/results/sandbox_overhead.json]

For each isolation tier (bubblewrap, the unprivileged landlock tier, and "none", the
plain subprocess), measured on this machine:

* `start_ms`      start_worker("") until the worker is ready (spawn, sandbox set-up,
                  interpreter start, bootstrap), then aclose (not timed)
* `cell_ms`       a trivial cell (`pass`) round trip on a warm worker
* `subcall_ms`    a cell making one `llm_query` answered at once by the engine: two more
                  control-channel frames
* `load_40mb_ms`  start_worker with a 40 MB str context, until ready
* `close_ms`      aclose: kill every process, reap, verify none is left

Each figure is the median over the repeats, with min and max. The first start of each mode
(interpreter probe, tier probe) is excluded. Wall-clock on a shared machine: compare
modes within one run, not across machines.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from rlm_async.sandbox import SandboxConfig, WorkerRequest, start_worker

_CONTEXT_40MB = ("lorem ipsum dolor sit amet, " * 1_500_000)[:40_000_000]


async def _answer(request: WorkerRequest) -> list[str]:
    return ["ok"] * len(request.prompts)


def _summary(samples: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples]
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms), "n": len(ms)}


async def _starts(modes: list[str], repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    """Start and close times per mode, the modes interleaved so that a shared machine's load
    weighs on each alike."""
    out: dict[str, tuple[list[float], list[float]]] = {m: ([], []) for m in modes}
    for _ in range(repeats):
        for mode in modes:
            config = SandboxConfig(isolation=mode)  # type: ignore[arg-type]
            t0 = time.perf_counter()
            worker = await start_worker("", config)
            out[mode][0].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await worker.aclose()
            out[mode][1].append(time.perf_counter() - t0)
    return out


async def _measure(
    mode: str, repeats: int, cells: int, start: list[float], close: list[float]
) -> dict[str, Any]:
    config = SandboxConfig(isolation=mode)  # type: ignore[arg-type]
    warm = await start_worker("", config)
    isolated = warm.isolated
    tier = warm.tier
    await warm.aclose()
    load = []
    for _ in range(max(3, repeats // 3)):
        t0 = time.perf_counter()
        worker = await start_worker(_CONTEXT_40MB, config)
        load.append(time.perf_counter() - t0)
        await worker.aclose()
    worker = await start_worker("", config)
    cell, sub = [], []
    try:
        for _ in range(cells):
            t0 = time.perf_counter()
            await worker.run_cell("pass", _answer)
            cell.append(time.perf_counter() - t0)
        for _ in range(cells):
            t0 = time.perf_counter()
            await worker.run_cell("llm_query('x')", _answer)
            sub.append(time.perf_counter() - t0)
    finally:
        await worker.aclose()
    return {
        "mode": mode,
        "tier": tier,
        "isolated": isolated,
        "start_ms": _summary(start),
        "cell_ms": _summary(cell),
        "subcall_ms": _summary(sub),
        "load_40mb_ms": _summary(load),
        "close_ms": _summary(close),
    }


def _table(rows: list[dict[str, Any]]) -> str:
    keys = ["start_ms", "cell_ms", "subcall_ms", "load_40mb_ms", "close_ms"]
    head = f"{'mode (median [min-max] ms)':<28}" + "".join(f"{k:>22}" for k in keys)
    lines = [head, "-" * len(head)]
    for row in rows:
        cells = "".join(
            f"{row[k]['median']:>9.2f} [{row[k]['min']:.1f}-{row[k]['max']:.1f}]".rjust(22) for k in keys
        )
        lines.append(f"{row['mode'] + (' (isolated)' if row['isolated'] else ''):<28}{cells}")
    return "\n".join(lines)


async def _measure_all(repeats: int, cells: int) -> list[dict[str, Any]]:
    modes = []
    for mode in ("bubblewrap", "landlock", "none"):
        try:  # the first start of each mode probes and fills caches: not timed
            warm = await start_worker("", SandboxConfig(isolation=mode))  # type: ignore[arg-type]
            await warm.aclose()
            modes.append(mode)
        except Exception as exc:  # e.g. bwrap missing: report, measure the rest
            print(f"{mode}: not measured ({type(exc).__name__}: {exc})")
    starts = await _starts(modes, repeats)
    return [await _measure(mode, repeats, cells, *starts[mode]) for mode in modes]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cells", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/sandbox_overhead.json")
    args = parser.parse_args(argv)
    rows = anyio.run(_measure_all, args.repeats, args.cells)
    print(_table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "sandbox_overhead",
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "kernel": platform.release(),
        "repeats": args.repeats,
        "cells": args.cells,
        "results": rows,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
