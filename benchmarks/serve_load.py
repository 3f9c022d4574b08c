"""Load test of `rlm-async serve` with locust (headless, loopback only, bounded in count and
time): N concurrent queries against one query alone.

    .venv/bin/python benchmarks/serve_load.py [--users 100] [--tokens 100K] [--chunks 20]
        [--run-time 300] [--out benchmarks/results/serve_load.json]

Starts the server on 127.0.0.1 (port 0) on the simulator in-process with the bundled
latencies (root 0.4 s + 4 ms/token, sub 0.3 s + 4 ms/token; configs/sim.toml), uploads one
COUNT (OOLONG-like counting) context per user with `POST /v1/files`, times one query
alone, then runs locust: `--users` users spawned at once, each sending one chat completion
naming its file (`rlm.file_id`), checking the answer against the workload's truth, and
stopping. Figures: `ratio` = aggregate wall (first request sent -> last answer back) / the
wall of the one query alone (target <= 1.2 at 100 users), errors, answers right. Exit 1
on any error or wrong answer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _provenance import provenance

from rlm_async.workloads import oolong_counting, parse_size

HERE = Path(__file__).parent
RESULTS = HERE / "results"
ROOT = HERE.parent


def _config(chunks: int, users: int) -> str:
    base = (ROOT / "configs" / "sim.toml").read_text()
    base = re.sub(r"chunks = \d+", f"chunks = {chunks}", base)
    return f"[serve]\nmax_running = {users}\nmax_queued = {users}\n\n" + base


def _start(config_path: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    env = {k: v for k, v in os.environ.items() if k != "RLM_SERVE_KEYS"}
    with open(log, "wb") as stderr:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlm_async.cli", "serve", "--config", str(config_path), "--port", "0"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = re.search(r"listening on (http://\S+)/v1", log.read_text(errors="replace"))
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("the server did not start")


def run(users: int, tokens: int, chunks: int, run_time: int, workdir: Path) -> dict[str, Any]:
    config_path = workdir / "serve.toml"
    config_path.write_text(_config(chunks, users))
    proc, root = _start(config_path, workdir / "server.log")
    try:
        workloads = [oolong_counting(tokens, seed=i) for i in range(users + 1)]
        plan = []
        with httpx.Client(base_url=root, timeout=600) as c:
            for w in workloads:
                assert isinstance(w.context, str)
                r = c.post("/v1/files", content=w.context.encode(), headers={"content-type": "text/plain"})
                r.raise_for_status()
                plan.append({"file_id": r.json()["id"], "query": w.query, "truth": w.truth})
            # One query alone (its own context, not one of the load's).
            alone = plan.pop()
            t0 = time.monotonic()
            r = c.post(
                "/v1/chat/completions",
                json={
                    "model": "rlm",
                    "messages": [{"role": "user", "content": alone["query"]}],
                    "rlm": {"file_id": alone["file_id"]},
                },
            )
            single_wall = time.monotonic() - t0
            r.raise_for_status()
            single_ok = str(alone["truth"]) in r.json()["choices"][0]["message"]["content"]
        plan_path, out_path = workdir / "plan.json", workdir / "results.jsonl"
        plan_path.write_text(json.dumps(plan))
        env = {**os.environ, "RLM_LOAD_PLAN": str(plan_path), "RLM_LOAD_OUT": str(out_path)}
        locust = [
            str(Path(sys.executable).with_name("locust")),
            "-f", str(HERE / "_locustfile.py"),
            "--headless", "--users", str(users), "--spawn-rate", str(users),
            "--host", root, "--run-time", f"{run_time}s", "--stop-timeout", "10",
            "--only-summary", "--json-file", str(workdir / "locust"),
        ]  # fmt: skip
        lp = subprocess.run(locust, env=env, capture_output=True, timeout=run_time + 60)
        records = (
            [json.loads(line) for line in out_path.read_text().splitlines()] if out_path.exists() else []
        )
        with httpx.Client(base_url=root, timeout=10) as c:
            metrics = c.get("/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    ok = [r for r in records if r.get("status_code") == 200]
    aggregate = (max(r["finished"] for r in records) - min(r["started"] for r in records)) if records else 0.0
    walls = [r["finished"] - r["started"] for r in records]
    return {
        "users": users,
        "tokens": tokens,
        "chunks": chunks,
        "single_wall_s": single_wall,
        "single_correct": single_ok,
        "aggregate_wall_s": aggregate,
        "ratio": aggregate / single_wall if single_wall else None,
        "requests": len(records),
        "errors": len(records) - len(ok) + (users - len(records)),
        "correct": sum(1 for r in ok if r.get("correct")),
        "query_wall_median_s": statistics.median(walls) if walls else None,
        "query_wall_max_s": max(walls) if walls else None,
        "locust_exit": lp.returncode,
        "locust_stderr_tail": lp.stderr.decode(errors="replace")[-1500:],
        "metrics_429_sent": next(
            (line.split()[-1] for line in metrics.splitlines() if line.startswith("rlm_http_429_sent_total")),
            None,
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--tokens", default="100K")
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--run-time", type=int, default=300, help="locust's bound, seconds")
    p.add_argument("--out", default=str(RESULTS / "serve_load.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rlm-load-") as tmp:
        load0 = os.getloadavg()
        r = run(args.users, parse_size(args.tokens), args.chunks, args.run_time, Path(tmp))
    print(
        "| users | one query alone s | aggregate wall s | ratio | errors | right | median query s | max query s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {r['users']} | {r['single_wall_s']:.2f} | {r['aggregate_wall_s']:.2f} | {r['ratio']:.2f} | "
        f"{r['errors']} | {r['correct']}/{r['users']} | {r['query_wall_median_s'] or 0:.2f} | {r['query_wall_max_s'] or 0:.2f} |"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {**provenance("serve_load.py", argv, loadavg_before=load0, loadavg_after=os.getloadavg()), **r},
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0 if r["errors"] == 0 and r["correct"] == r["users"] else 1


if __name__ == "__main__":
    sys.exit(main())
