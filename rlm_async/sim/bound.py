"""Critical-path lower bounds: the least wall time the simulator's own latency model allows
for the requests it served, so a benchmark can say how close an engine came to the limit.

    with SimProcess(config) as sim:
        result = await rlm.acompletion(context, query)
    path = critical_path(sim.read_log(), config.latency)
    print(result.execution_time / path.bound_s)        # 1.0 would be a perfect engine

The model of an RLM run (one level of sub-calls, `max_depth=1`):

- **Root turns are sequential.** Each turn needs the previous turn's reply and the output
  of the code it ran, so every root turn lies on the critical path.
- **The sub-calls sent between two root turns are one fan-out.** Nothing orders them but
  the server: they can all be in service at once, so the fan-out takes no less than its
  slowest member. With a `capacity` of C requests served at once it takes no less than
  the sum of its members' service times / C (list scheduling's bound). With rate limits it
  takes no less than the time to admit its requests and counted tokens (prompt +
  `max_tokens`, as the simulator counts them) from full buckets refilling at RPM/60 and
  TPM/60 a second, plus the shortest service time of the fan-out (the last request
  admitted must still be served). The fan-out's bound is the largest of these.

Each request's service time is, by default, the one the simulator *drew* for it
(`LogEntry.modeled_s`: latency model plus that request's jitter draw, with the cached
tokens it actually got), which makes the bound exact for the simulator: a perfect,
zero-overhead client would take exactly this long on the same draws. With `sampled=False`
(or for a log written before `modeled_s` existed) it is `LatencyModel.lower_bound(...)`:
the jitter at its minimum, a bound for any draw of the jitter, a little looser.

What is counted: requests answered with a well-formed 200 (outcomes "ok" and "slow").
Refused attempts (429s, injected 500s), dropped or malformed replies and cancelled requests
add nothing, so with faults the figure is still a lower bound, not the least time given
those faults. What it does not model: a warm-up before a fan-out (an engine's choice that
serialises one request ahead of the rest: the bound does not grant it), the time to send
and read bytes, and child RLMs (`max_depth > 1`): their turns carry the root system prompt
and would be counted as sequential root turns, which is no longer a lower bound.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from ._config import LatencyModel, RateLimits
from ._log import SERVED_OUTCOMES, LogEntry

__all__ = ["CriticalPath", "FanoutBound", "critical_path", "critical_path_bound", "service_time"]


@dataclass(frozen=True, slots=True, kw_only=True)
class FanoutBound:
    """The least time one fan-out (the sub-calls between two root turns) can take."""

    after_turn: int
    """How many root turns came before it (0: sub-calls before any root turn)."""
    requests: int
    slowest_s: float
    """Its slowest member's service time."""
    total_service_s: float
    """The sum of its members' service times (what one-at-a-time service would take)."""
    capacity_s: float = 0.0
    """`total_service_s / capacity`, when a capacity applies; else 0."""
    rate_s: float = 0.0
    """Time to admit it under the rate limits plus its fastest member's service; else 0."""

    @property
    def bound_s(self) -> float:
        return max(self.slowest_s, self.capacity_s, self.rate_s)

    @property
    def limited_by(self) -> Literal["slowest", "capacity", "rate"]:
        """Which term sets the bound (the slowest member on a tie)."""
        if self.capacity_s > self.slowest_s and self.capacity_s >= self.rate_s:
            return "capacity"
        if self.rate_s > self.slowest_s:
            return "rate"
        return "slowest"


@dataclass(frozen=True, slots=True, kw_only=True)
class CriticalPath:
    """The bound and its parts: the root turns' service times and each fan-out's bound."""

    root_turns_s: tuple[float, ...] = ()
    fanouts: tuple[FanoutBound, ...] = ()
    source: Literal["sampled", "jitter_min", "mixed"] = "sampled"
    """Whether service times are the simulator's draws (`modeled_s`), the jitter-minimum
    model (`LatencyModel.lower_bound`), or some of each (a log missing some `modeled_s`)."""
    excluded: int = 0
    """Logged requests left out (refused, failed, cancelled)."""
    per_request: dict[str, float] = field(default_factory=dict, compare=False, repr=False)
    """Service time used for each counted request, by log id."""

    @property
    def root_s(self) -> float:
        return sum(self.root_turns_s)

    @property
    def fanout_s(self) -> float:
        return sum(f.bound_s for f in self.fanouts)

    @property
    def bound_s(self) -> float:
        """The least wall time for the run: root turns plus each fan-out's bound."""
        return self.root_s + self.fanout_s

    @property
    def sequential_s(self) -> float:
        """What the same requests take served strictly one at a time (no overlap at all)."""
        return self.root_s + sum(f.total_service_s for f in self.fanouts)


def service_time(entry: LogEntry, latency: LatencyModel | None, *, sampled: bool = True) -> float:
    """The service time of one logged request: its drawn `modeled_s` when `sampled` and the
    log has it, else the latency model's jitter-minimum for its kind and tokens."""
    if sampled and entry.modeled_s is not None:
        return entry.modeled_s
    if latency is None:
        raise ValueError(f"request {entry.id} has no modeled_s in the log; pass the LatencyModel to bound it")
    return latency.lower_bound(
        "root" if entry.kind == "root" else "sub",
        prompt_tokens=entry.prompt_tokens,
        completion_tokens=entry.completion_tokens,
        cached_tokens=entry.cached_tokens,
    )


def critical_path(
    log: Iterable[LogEntry],
    latency: LatencyModel | None = None,
    *,
    capacity: int | None = None,
    rate_limits: RateLimits | None = None,
    sampled: bool = True,
) -> CriticalPath:
    """The critical path of a logged run (see the module docstring).

    `log` is a `RequestLog` or any entries (ordered here by arrival, `seq`). `latency` is
    the server's `LatencyModel`: needed when `sampled=False` or an entry lacks `modeled_s`,
    and the source of the default sub-call capacity (`latency.sub.capacity`). `capacity`
    overrides that: pass 1 for the bound of a client that sends one request at a time.
    `rate_limits` are the server's RPM/TPM (`SimConfig.rate_limits`)."""
    if capacity is not None and capacity < 1:
        raise ValueError(f"capacity must be >= 1 or None, got {capacity}")
    cap = capacity if capacity is not None else (latency.sub.capacity if latency is not None else None)
    rpm = rate_limits.rpm if rate_limits is not None else None
    tpm = rate_limits.tpm if rate_limits is not None else None

    roots: list[float] = []
    fanouts: list[FanoutBound] = []
    per_request: dict[str, float] = {}
    wave: list[tuple[float, int]] = []  # (service time, counted tokens)
    excluded = 0
    kinds: set[bool] = set()

    def close_wave() -> None:
        if wave:
            fanouts.append(_fanout_bound(wave, after_turn=len(roots), capacity=cap, rpm=rpm, tpm=tpm))
            wave.clear()

    for entry in sorted(log, key=lambda e: e.seq):
        if entry.start is None or entry.outcome not in SERVED_OUTCOMES:
            excluded += 1
            continue
        kinds.add(sampled and entry.modeled_s is not None)
        t = service_time(entry, latency, sampled=sampled)
        per_request[entry.id] = t
        if entry.kind == "root":
            close_wave()
            roots.append(t)
        else:
            wave.append((t, entry.prompt_tokens + (entry.max_tokens or 0)))
    close_wave()
    source: Literal["sampled", "jitter_min", "mixed"] = (
        "mixed" if len(kinds) > 1 else "sampled" if kinds == {True} else "jitter_min"
    )
    if not kinds:
        source = "sampled" if sampled else "jitter_min"
    return CriticalPath(
        root_turns_s=tuple(roots),
        fanouts=tuple(fanouts),
        source=source,
        excluded=excluded,
        per_request=per_request,
    )


def _fanout_bound(
    wave: list[tuple[float, int]], *, after_turn: int, capacity: int | None, rpm: int | None, tpm: int | None
) -> FanoutBound:
    """The bound of one fan-out: its requests' (service time, counted tokens), the server's
    capacity and its rate limits."""
    times = [t for t, _ in wave]
    total = sum(times)
    capacity_s = total / capacity if capacity else 0.0
    rate_s = 0.0
    if rpm or tpm:
        admit = 0.0
        if rpm:
            admit = max(admit, (len(wave) - rpm) / (rpm / 60.0))
        if tpm:
            admit = max(admit, (sum(k for _, k in wave) - tpm) / (tpm / 60.0))
        if admit > 0:
            rate_s = admit + min(times)
    return FanoutBound(
        after_turn=after_turn,
        requests=len(wave),
        slowest_s=max(times),
        total_service_s=total,
        capacity_s=capacity_s,
        rate_s=rate_s,
    )


def critical_path_bound(
    log: Iterable[LogEntry],
    latency: LatencyModel | None = None,
    *,
    capacity: int | None = None,
    rate_limits: RateLimits | None = None,
    sampled: bool = True,
) -> float:
    """The least wall time, in seconds, the simulator's latency model allows for the
    requests in `log`: `critical_path(...).bound_s` (see the module docstring)."""
    return critical_path(log, latency, capacity=capacity, rate_limits=rate_limits, sampled=sampled).bound_s
