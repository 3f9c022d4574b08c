"""`/metrics` in the Prometheus text exposition format (version 0.0.4), written by hand:
a few counters and gauges do not need a client library.

Counters grow from the engine's events (through `_adapter`) and from the service itself;
gauges are read when scraped. No label ever holds a key or a prompt: tenants are named by
the operator (or by a hash of the key), statuses and kinds come from fixed sets.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from .. import _events
from ._adapter import event_fields
from ._gc_times import GcTimes
from ._loop_lag import LoopLag

__all__ = ["Metrics"]


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels
    )
    return "{" + inner + "}"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


class Metrics:
    def __init__(self) -> None:
        self.queries: Counter[tuple[tuple[str, str], ...]] = Counter()
        self.subcalls: Counter[tuple[tuple[str, str], ...]] = Counter()
        self.tokens: Counter[tuple[tuple[str, str], ...]] = Counter()
        self.dollars: dict[tuple[tuple[str, str], ...], float] = {}
        self.http_429_sent = 0
        self.upstream_429 = 0
        self.sandbox_tiers: Counter[str] = Counter()
        self.pooled_workers = 0
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.loop_lag: LoopLag | None = None
        self.gc_times: GcTimes | None = None

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def query_finished(self, status: str, tenant: str) -> None:
        self.queries[(("status", status), ("tenant", tenant))] += 1

    def sink(self, tenant: str) -> _events.EventSink:
        """An event sink counting one query's calls, tokens, dollars, upstream 429s and
        the sandbox tier of its workers."""

        def observe(event: _events.Event) -> None:
            # A payload is built only for the kinds counted here, not for every event.
            kind = event.kind
            if kind == "call.finish":
                f = event_fields(event)
                status = str(f.get("status"))
                self.subcalls[(("status", status), ("tenant", tenant))] += 1
                for name in ("prompt_tokens", "cached_tokens", "completion_tokens"):
                    value = f.get(name) or 0
                    if value:
                        kind_label = ("kind", name.removesuffix("_tokens"))
                        self.tokens[(kind_label, ("tenant", tenant))] += int(value)
                cost = f.get("cost_usd") or 0.0
                if cost:
                    key = (("tenant", tenant),)
                    self.dollars[key] = self.dollars.get(key, 0.0) + float(cost)
            elif kind == "call.retry":
                if "RateLimited" in str(event_fields(event).get("error", "")):
                    self.upstream_429 += 1
            elif kind == "worker.start":
                f = event_fields(event)
                self.sandbox_tiers[str(f.get("tier") or "unknown")] += 1
                if f.get("pooled"):
                    self.pooled_workers += 1

        return observe

    def render(self) -> str:
        out: list[str] = []

        def family(
            name: str, kind: str, help_text: str, samples: dict[tuple[tuple[str, str], ...], float]
        ) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in sorted(samples.items()):
                out.append(f"{name}{_labels(labels)} {_number(value)}")

        family("rlm_queries_total", "counter", "Queries finished, by status.", dict(self.queries))
        family(
            "rlm_subcalls_total", "counter", "Model calls made by queries, by status.", dict(self.subcalls)
        )
        family("rlm_tokens_total", "counter", "Tokens reported by model servers, by kind.", dict(self.tokens))
        family("rlm_cost_usd_total", "counter", "Dollars spent on model calls.", dict(self.dollars))
        family(
            "rlm_http_429_sent_total", "counter", "429 responses this server sent.", {(): self.http_429_sent}
        )
        family(
            "rlm_upstream_429_total",
            "counter",
            "429 responses received from model servers.",
            {(): self.upstream_429},
        )
        family(
            "rlm_sandbox_workers_total",
            "counter",
            "REPL workers started, by sandbox tier.",
            {(("tier", tier),): n for tier, n in self.sandbox_tiers.items()},
        )
        family(
            "rlm_sandbox_workers_pooled_total",
            "counter",
            "REPL workers taken pre-started from the worker pool (the rest started on demand).",
            {(): self.pooled_workers},
        )
        for name, (help_text, read) in self.gauges.items():
            family(name, "gauge", help_text, {(): read()})
        if (lag := self.loop_lag) is not None:
            name = "rlm_event_loop_lag_seconds"
            out.append(
                f"# HELP {name} How late the service's event loop woke from a {lag.interval_s:g} s sleep: "
                "past a few ms, every request and model call waits as long."
            )
            out.append(f"# TYPE {name} histogram")
            out += [f'{name}_bucket{{le="{le}"}} {n}' for le, n in lag.cumulative()]
            out.append(f"{name}_sum {_number(lag.sum_s)}")
            out.append(f"{name}_count {lag.count}")
        if (times := self.gc_times) is not None:
            family(
                "rlm_gc_collections_total",
                "counter",
                "Garbage collections of this process, by generation (2: full).",
                {(("generation", str(g)),): n for g, n in enumerate(times.collections)},
            )
            family(
                "rlm_gc_seconds_total",
                "counter",
                "Seconds the process spent collecting garbage (its event loop stopped), by generation.",
                {(("generation", str(g)),): secs for g, secs in enumerate(times.seconds)},
            )
        return "\n".join(out) + "\n"
