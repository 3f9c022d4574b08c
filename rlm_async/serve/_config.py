"""The service's configuration: the `[serve]` table of a config file, beside the RLM's own.

    [serve]
    name = "rlm"                    # the profile this file defines (the `model` clients send)
    max_running = 100               # queries at once
    max_queued = 200                # waiting beyond those; more get 429
    worker_pool = 16                # REPL workers kept pre-started, per profile (0: none)
    [serve.request_limits]          # what a request may ask for, at most
    max_depth = 3
    max_usd = 5.0
    max_seconds = 900
    [serve.tenant_limits]           # per key, over the server's lifetime
    max_usd = 50.0
    requests_per_minute = 600
    [serve.profiles]                # more profiles: name = another config file
    deep = "deep.toml"

Every other table is the RLM configuration of the default profile (see `configs/`), and
`[sim]` the in-process simulator's (for models whose base_url is "sim").
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._checks import is_whole_number
from .._config import RLMConfig, load_dataclass
from .._sockets import checked_port
from ..exceptions import ConfigError
from ._admission import TenantLimits
from ._jobs import MAX_EVENTS

__all__ = ["RequestLimits", "ServeConfig", "bundled_sim_config", "load_serve_config"]

_BUNDLED_SIM = Path(__file__).with_name("default.toml")
"""A copy of configs/sim.toml shipped in the package: the simulator, in-process."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestLimits:
    """The most a single request may ask for (its `rlm` extension is bounded by these), and
    the defaults when it asks for nothing. `None` leaves the profile's own setting."""

    max_depth: int = 3
    """Recursion depth a request may ask for."""
    max_usd: float | None = 5.0
    """Dollars per query: a request's `max_usd` is capped to this; the default when absent
    is the profile's budget, also capped."""
    max_seconds: float | None = 900.0
    """Deadline per query, capped the same way."""


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Everything `rlm-async serve` needs besides the profiles' RLM configurations."""

    profiles: Mapping[str, RLMConfig] = field(default_factory=dict)
    """Model name -> RLM configuration. With one profile, any model name is accepted."""
    sim: Mapping[str, Any] | None = None
    """The `[sim]` table: the in-process simulator for models whose base_url is "sim"."""
    host: str = "127.0.0.1"
    port: int = 8000
    max_running: int = 100
    """Queries running at once."""
    max_queued: int = 200
    """Queries waiting for a slot; one more is refused with 429 and `retry-after`."""
    max_body_bytes: int = 16 * 1024 * 1024
    """JSON request bodies (chat completions, jobs); larger is 413: upload the context
    with `POST /v1/files` instead."""
    max_file_bytes: int = 512 * 1024 * 1024
    """Uploaded files (`POST /v1/files`)."""
    max_events: int = MAX_EVENTS
    """Progress events each job keeps for its events stream (the newest; a few hundred
    bytes each). A client that resumes, or starts reading, after older ones were dropped
    gets a `gap` event saying how many it missed."""
    data_dir: str | None = None
    """Uploaded files and the job store; `None`: a fresh temporary directory (nothing
    survives a restart)."""
    keys_env: str | None = "RLM_SERVE_KEYS"
    """Environment variable with bearer keys (`tenant:key`, comma-separated)."""
    keys_file: str | None = None
    """File with bearer keys, one `tenant:key` per line."""
    worker_pool: int = 16
    """REPL workers kept pre-started for each profile (its `RLMConfig.worker_pool`): a
    query takes one instead of waiting for a start-up; each is used by one RLM node only,
    then killed, and refilled in the background while the server has little else to do.
    About 18 MB resident each while idle (bubblewrap tier, measured). Size it to the bursts you expect; a burst beyond it starts
    the rest on demand. 0: no pool."""
    grace_s: float = 30.0
    """On SIGTERM: how long in-flight queries may take to finish before they are cancelled."""
    request_limits: RequestLimits = field(default_factory=RequestLimits)
    tenant_limits: TenantLimits = field(default_factory=TenantLimits)
    otel: bool = False
    """Export OpenTelemetry spans (needs the `otel` extra; the exporter is the SDK's,
    configured by the standard OTEL_* environment variables)."""
    trace_dir: str | None = None
    """Write every query's events as a JSONL trace, `<query_id>.jsonl` in this directory
    (what `rlm-async run --trace` writes; `rlm-async trace view` opens them). Off by default:
    a busy server writes one file per query. Prompts and replies are not in them unless the
    profile logs text."""

    def __post_init__(self) -> None:
        checked_port(self.port, where="[serve] ")
        if self.max_running < 1 or self.max_queued < 0:
            raise ConfigError("[serve] max_running must be >= 1 and max_queued >= 0")
        for name in ("max_body_bytes", "max_file_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"[serve] {name} must be a whole number of bytes >= 1, not {value!r}")
        if not is_whole_number(self.max_events) or self.max_events < 1:
            raise ConfigError(
                f"[serve] max_events must be a whole number >= 1 (events kept per job), not {self.max_events!r}"
            )
        if (
            isinstance(self.grace_s, bool)
            or not isinstance(self.grace_s, (int, float))
            or not self.grace_s >= 0
        ):
            raise ConfigError(
                f"[serve] grace_s must be seconds >= 0 (0: cancel running queries at once on SIGTERM), "
                f"not {self.grace_s!r}"
            )
        if not isinstance(self.worker_pool, int) or self.worker_pool < 0:
            raise ConfigError(
                f"[serve] worker_pool must be an int >= 0 (0: no pool), not {self.worker_pool!r}"
            )
        if not self.profiles:
            raise ConfigError("[serve] needs at least one profile (an RLM configuration)")


_SERVE_KEYS = {f.name for f in dataclasses.fields(ServeConfig)} - {"profiles", "sim"}


def _rlm_config(data: Mapping[str, Any], where: str) -> RLMConfig:
    rlm = {k: v for k, v in data.items() if k not in ("serve", "sim")}
    return RLMConfig.from_dict(rlm, source=where)


def load_serve_config(path: str | Path | None = None, **overrides: Any) -> ServeConfig:
    """Read a config file (the bundled simulator's, a copy of `configs/sim.toml`, when `path` is None)."""
    p = Path(path) if path is not None else _BUNDLED_SIM
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist; see configs/ for examples") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    serve = dict(data.get("serve", {}))
    name = str(serve.pop("name", "rlm"))
    profiles: dict[str, RLMConfig] = {name: _rlm_config(data, str(p))}
    for other, file in dict(serve.pop("profiles", {})).items():
        other_path = (p.parent / str(file)).resolve()
        try:
            other_data = tomllib.loads(other_path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{p} [serve.profiles] {other}: cannot read {other_path} ({exc})") from None
        profiles[str(other)] = _rlm_config(other_data, str(other_path))
    unknown = sorted(set(serve) - _SERVE_KEYS)
    if unknown:
        raise ConfigError(
            f"{p} [serve]: unknown key(s) {unknown}; known: {sorted(_SERVE_KEYS | {'name', 'profiles'})}"
        )
    serve.update({k: v for k, v in overrides.items() if v is not None})
    if "request_limits" in serve:
        serve["request_limits"] = load_dataclass(
            RequestLimits, serve["request_limits"], f"{p} [serve.request_limits]"
        )
    if "tenant_limits" in serve:
        serve["tenant_limits"] = load_dataclass(
            TenantLimits, serve["tenant_limits"], f"{p} [serve.tenant_limits]"
        )
    return ServeConfig(profiles=profiles, sim=data.get("sim"), **serve)


def bundled_sim_config() -> Path:
    return _BUNDLED_SIM
