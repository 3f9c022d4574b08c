"""How many lease round trips one coordinator actor serves a second: the figure that says
where a single coordinator becomes the bottleneck (docs/scale.md).

    .venv/bin/python benchmarks/ray_coordinator.py [--calls 5000] [--callers 64]
                                                   [--out benchmarks/results/ray_coordinator.json]

Starts a one-node Ray here (one CPU, small object store, no dashboard), one `Coordinator`
whose limits never make a caller wait, and `--callers` concurrent async callers (in this
driver) that call `take` until `--calls` are done. Reports calls per second, and the
latency of one call made alone (median of 200). The coordinator is one asyncio loop on
one core, so calls/s is what one endpoint's coordinator can serve before it shards.
Needs the ray extra.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import ray
from _provenance import provenance

from rlm_async.ray import Coordinator
from rlm_async.ray._local import local_token


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    huge = 10**12
    coord: Any = ray.remote(Coordinator).remote("bench", {"m": (float(huge), huge)})
    await coord.take.remote("m", "requests", 1, 1)  # warm
    alone = []
    for _ in range(200):
        t = time.perf_counter()
        await coord.take.remote("m", "requests", 1, 1)
        alone.append(time.perf_counter() - t)
    left = args.calls

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await coord.take.remote("m", "requests", 1, 1)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(args.callers)))
    wall = time.perf_counter() - started
    return {
        "calls": args.calls,
        "callers": args.callers,
        "calls_per_s": round(args.calls / wall, 1),
        "alone_median_ms": round(1000 * statistics.median(alone), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/ray_coordinator.json")
    args = parser.parse_args()
    load = os.getloadavg()
    # Ray's authentication stays on, with a token of this run's own (not one saved under ~/.ray)
    with local_token():
        ray.init(
            num_cpus=1, include_dashboard=False, object_store_memory=80 * 1024 * 1024, log_to_driver=False
        )
        try:
            figures = asyncio.run(measure(args))
        finally:
            ray.shutdown()
    result = {
        **provenance("ray_coordinator.py", load_average_before=load, load_average_after=os.getloadavg()),
        **figures,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
