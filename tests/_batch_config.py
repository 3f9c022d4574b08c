"""What the batch end-to-end tests (`test_e2e_batch.py`, and `test_e2e_ray.py` on a Ray
cluster) share: the TOML config `rlm-async batch` reads, the prices it bills at, the input
file and the simulator that answers it.

The config's prices are written from `PRICES`, so the dollars a test computes from the
simulator's log (`rlm_async.sim.priced(log, PRICES)`) are the ones the batch charged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import bwrap_works

from rlm_async._governor import ModelPrice
from rlm_async.sim import Policies, PolicySpec, SimConfig
from rlm_async.workloads import Workload, oolong_counting, s_niah

__all__ = ["PRICES", "read_rows", "sim_config", "workloads", "write_config", "write_input"]

ROOT, SUB = "sim-model", "sim-mini"
PRICES = {
    ROOT: ModelPrice(input_per_mtok=1.25, cached_input_per_mtok=0.125, output_per_mtok=10.0),
    SUB: ModelPrice(input_per_mtok=0.25, cached_input_per_mtok=0.025, output_per_mtok=2.0),
}


def write_config(
    path: Path,
    base_url: str,
    *,
    per_query_usd: float | None = None,
    limits: dict[str, tuple[int, int]] | None = None,
    server: str | None = None,
) -> Path:
    """A config with the root model `sim-model` and the sub model `sim-mini` at `base_url`,
    at temperature 0 (the journal reuses such calls), up to 6 iterations, fast retries, and
    the strongest sandbox this machine has.

    `per_query_usd`: each query's own dollar cap. `limits`: per model, the client-side
    (requests, tokens) per minute. `server`: what the models' server is ("off" skips
    identifying it); left out, the default ("auto")."""
    isolation = "bwrap" if bwrap_works() else "none"
    sections = ["[rlm]\nmax_iterations = 6\n"]
    for table, model, max_tokens in (("root", ROOT, 1024), ("sub", SUB, 256)):
        sections.append(_model_table(table, model, base_url, max_tokens, server))
        if limits is not None:
            rpm, tpm = limits[model]
            sections.append(f"[{table}.limits]\nrequests_per_minute = {rpm}\ntokens_per_minute = {tpm}\n")
    sections.append("[governor]\nchars_per_token = 4.0\n")
    sections.append("[governor.retry]\nmax_attempts = 8\nbase_s = 0.05\n")
    sections.append(f'[sandbox]\nisolation = "{isolation}"\n')
    if per_query_usd is not None:
        sections.append(f"[budget]\nmax_usd = {per_query_usd}\n")
    path.write_text("\n".join(sections), encoding="utf-8")
    return path


def _model_table(table: str, model: str, base_url: str, max_tokens: int, server: str | None) -> str:
    price = PRICES[model]
    lines = [
        f"[{table}]",
        f'model = "{model}"',
        f'base_url = "{base_url}"',
        'api_key_env = ""',
        f"max_tokens = {max_tokens}",
        "temperature = 0.0",
        *([f'server = "{server}"'] if server is not None else []),
        f"prices = {{ input_per_mtok = {price.input_per_mtok}, cached_input_per_mtok = "
        f"{price.cached_input_per_mtok}, output_per_mtok = {price.output_per_mtok} }}",
    ]
    return "\n".join(lines) + "\n"


def workloads(n: int) -> dict[str, Workload]:
    """Alternating needle and counting questions over small contexts, each with its truth."""
    return {f"q{i:04d}": (s_niah("2k", seed=i) if i % 2 else oolong_counting("2k", seed=i)) for i in range(n)}


def write_input(path: Path, items: dict[str, Workload]) -> Path:
    """The batch's JSONL input: one `{"id", "query", "context"}` a line."""
    with path.open("w", encoding="utf-8") as f:
        for item_id, w in items.items():
            f.write(json.dumps({"id": item_id, "query": w.query, "context": w.context}) + "\n")
    return path


def sim_config(chunks: int = 4, **overrides: Any) -> SimConfig:
    """The simulator playing an RLM root that splits the context into `chunks` sub-calls."""
    return SimConfig(policies=Policies(root=PolicySpec(name="rlm", options={"chunks": chunks})), **overrides)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The batch's output rows."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
