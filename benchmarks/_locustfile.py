"""The locust user of `benchmarks/serve_load.py`: each simulated user sends exactly one chat
completion (its own uploaded context, named by `rlm.file_id`), checks the answer, appends
one JSON line to the results file, and stops; when every planned request is done, the
runner quits. Bounded by the plan's length, and by `--run-time` on the command line.

Environment: RLM_LOAD_PLAN (a JSON list of {file_id, query, truth}), RLM_LOAD_OUT (the
JSONL results file), RLM_LOAD_MODEL.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from locust import HttpUser, task
from locust.exception import StopUser

_PLAN: list[dict[str, Any]] = json.loads(open(os.environ["RLM_LOAD_PLAN"]).read())
_OUT = os.environ["RLM_LOAD_OUT"]
_MODEL = os.environ.get("RLM_LOAD_MODEL", "rlm")
_lock = threading.Lock()
_next = 0
_done = 0


def _take() -> dict[str, Any] | None:
    global _next
    with _lock:
        if _next >= len(_PLAN):
            return None
        item = _PLAN[_next]
        _next += 1
        return item


class RLMUser(HttpUser):
    wait_time = staticmethod(lambda: 0.0)  # type: ignore[assignment]

    @task
    def one_query(self) -> None:
        global _done
        item = _take()
        if item is None:
            raise StopUser()
        started, started_mono = time.time(), time.monotonic()
        body = {
            "model": _MODEL,
            "messages": [{"role": "user", "content": item["query"]}],
            "rlm": {"file_id": item["file_id"]},
        }
        # Monotonic too: the same clock as the server's trace events and the simulator's
        # log (CLOCK_MONOTONIC is system-wide), so a query's pieces line up across processes.
        record: dict[str, Any] = {"started": started, "started_mono": started_mono}
        with self.client.post(
            "/v1/chat/completions", json=body, catch_response=True, timeout=600
        ) as response:
            record["finished"], record["finished_mono"] = time.time(), time.monotonic()
            record["status_code"] = response.status_code
            if response.status_code == 200:
                data = response.json()
                answer = data["choices"][0]["message"]["content"]
                record["answer"] = answer
                record["rlm_status"] = data["rlm"]["status"]
                record["query_id"] = data["rlm"].get("query_id")  # its trace, under --trace
                record["correct"] = str(item["truth"]) in answer
                if not record["correct"]:
                    response.failure(f"wrong answer {answer!r} (truth {item['truth']})")
            else:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
        with _lock:
            with open(_OUT, "a") as f:
                f.write(json.dumps(record) + "\n")
            _done += 1
            finished_all = _done >= len(_PLAN)
        if finished_all:
            self.environment.runner.quit()  # type: ignore[union-attr]
        raise StopUser()
