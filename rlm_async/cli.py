"""`rlm-async`: the command line. The only module that prints.

    rlm-async demo                                  the built-in demo (no API key, no network)
    rlm-async run --context PATH|- --query TEXT [--config configs/NAME.toml] [--max-depth N] [--json]
    rlm-async sim [--config sim.toml] [--port P]    the simulated OpenAI-compatible server
    rlm-async trace view TRACE.jsonl -o run.html    a self-contained HTML timeline
    rlm-async batch INPUT.jsonl --out OUT.jsonl [--config ...] [--concurrency N] [--budget-usd X]
              [--budget-tokens N] [--journal PATH]    many queries under one budget, resumable
              [--ray [ADDRESS] [--ray-actors N]]      ... on a Ray cluster (the ray extra)
    rlm-async doctor [--config configs/NAME.toml] [--json]   what each server is, and the defaults;
              and which sandbox tier model code would run under (exit 2: none can run here)
    rlm-async doctor --sandbox [--isolation TIER] [--json]   the sandbox tiers alone
    rlm-async serve [--config X.toml] [--host H] [--port P]   an OpenAI-compatible server

Errors the user can fix (a missing file, an unreachable endpoint, a missing key, an unknown
model, a bad context) print one line naming the problem and the fix and exit 2; a
traceback only with --debug.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import sys
import tomllib
import traceback
from collections.abc import Sequence
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Any

import anyio

from . import _events, _loop
from ._config import RLMConfig
from ._context import Context
from ._result import RLMResult
from ._sockets import port_arg
from ._version import __version__
from .exceptions import ConfigError, MissingAPIKey, RLMError
from .sandbox import ISOLATION_TIERS, SandboxConfig
from .sandbox import diagnose as diagnose_sandbox
from .sandbox import render as render_sandbox

__all__ = ["main"]

_SIM_BASE_URL = "sim"
"""A model whose base_url is "sim" is served by the simulator that the config's [sim] table
describes, started in-process by `rlm-async run`."""


class CLIError(Exception):
    """A one-line, user-fixable problem."""


# ---------------------------------------------------------------------- arguments
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlm-async", description="Recursive Language Models, asynchronously.")
    p.add_argument("--version", action="version", version=f"rlm-async {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks (the exit code stays the same)")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer a query over a context file")
    run.add_argument(
        "--context", required=True, help="a text file, a .json file (list or dict), or - for stdin"
    )
    run.add_argument("--query", required=True, help="the question to answer over the context")
    run.add_argument("--config", help="a TOML file from configs/ (default: OpenAI, key from OPENAI_API_KEY)")
    run.add_argument("--max-depth", type=int, help="recursion depth (1 = the paper's setting)")
    run.add_argument("--max-iterations", type=int, help="root-model turns before a forced final answer")
    run.add_argument("--budget-usd", type=float, help="dollar cap over the whole call tree")
    run.add_argument("--timeout", type=float, help="wall-clock deadline in seconds")
    run.add_argument("--journal", help="SQLite response journal: completed calls are never paid for twice")
    run.add_argument("--trace", help="directory to write the JSONL trace into")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.add_argument("--quiet", action="store_true", help="no live progress")
    run.add_argument(
        "--isolation", choices=ISOLATION_TIERS, help="sandbox tier (default: the config's, auto)"
    )

    demo = sub.add_parser("demo", help="the built-in demo on the simulator (no key, no network)")
    demo.add_argument("--task", default="oolong", choices=("oolong", "s-niah", "oolong-pairs"))
    demo.add_argument("--tokens", default="1M", help="context size in simulator tokens (default 1M)")
    demo.add_argument("--chunks", type=int, default=200, help="chunks the root model fans out to")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--trace", help="directory to write the JSONL trace into")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    demo.add_argument("--quiet", action="store_true", help="no live progress")

    from .sim.server import build_parser as sim_parser

    sim_args = sim_parser(add_help=False)
    sub.add_parser(
        "sim",
        parents=[sim_args],
        help="run the simulated OpenAI-compatible server (a scripted stand-in, not a model)",
        description=sim_args.description,
    )

    batch = sub.add_parser("batch", help="answer a JSONL/CSV file of queries under one budget, resumably")
    batch.add_argument("input", help='JSONL ({"id", "query", "context" or "context_file"} a line) or CSV')
    batch.add_argument("--out", required=True, help="JSONL output, one row per input; rerun to resume")
    batch.add_argument("--config", help="a TOML file from configs/ (per-query caps go in its [budget])")
    batch.add_argument("--concurrency", type=int, default=8, help="queries at once (default 8)")
    batch.add_argument("--budget-usd", type=float, help="dollar cap over the whole batch")
    batch.add_argument("--budget-tokens", type=int, help="total-token cap over the whole batch")
    batch.add_argument("--journal", help="SQLite response journal: a rerun pays nothing twice")
    batch.add_argument("--max-context-chars", type=int, help="refuse larger contexts (default 100M)")
    batch.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    batch.add_argument("--quiet", action="store_true", help="no live progress")
    batch.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        metavar="ADDRESS",
        help="run on a Ray cluster (the ray extra): its address, 'auto' (default) or 'local' to start one here",
    )
    batch.add_argument("--ray-actors", type=int, default=2, help="query actors on the cluster (default 2)")
    batch.add_argument(
        "--ray-resources",
        help="custom resources each actor needs, as JSON (e.g. '{\"rlm_query\": 1}' to keep actors on nodes that have it)",
    )
    doctor = sub.add_parser("doctor", help="identify each configured server and show the settings it gets")
    doctor.add_argument("--config", help="a TOML file from configs/")
    doctor.add_argument("--json", action="store_true", help="print the decisions as JSON")
    doctor.add_argument(
        "--sandbox", action="store_true", help="only the sandbox: which isolation tiers work here"
    )
    doctor.add_argument(
        "--isolation", choices=ISOLATION_TIERS, default="auto", help="the tier to check (default auto)"
    )

    serve = sub.add_parser("serve", help="serve RLMs over an OpenAI-compatible API (default: the simulator)")
    serve.add_argument("--config", help="a TOML file from configs/ (default: the bundled simulator)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1; others need API keys)")
    serve.add_argument("--port", type=port_arg, help="port (default 8000; 0 picks a free one)")
    serve.add_argument("--otel", action="store_true", default=None, help="export OpenTelemetry spans")
    serve.add_argument("--trace", help="directory to write each query's JSONL trace into")

    trace = sub.add_parser("trace", help="work with JSONL traces")
    tsub = trace.add_subparsers(dest="trace_command", required=True)
    view = tsub.add_parser("view", help="write a self-contained HTML timeline of a trace")
    view.add_argument("trace_path")
    view.add_argument("-o", "--output", help="the HTML file (default: beside the trace)")
    return p


# ---------------------------------------------------------------------- run
def _read_context(spec: str) -> Context:
    if spec == "-":
        return sys.stdin.read()
    path = Path(spec)
    if not path.exists():
        raise CLIError(f"context file {path} does not exist; pass a text file, a .json file, or - for stdin")
    if path.is_dir():
        raise CLIError(f"context {path} is a directory; pass a file (or join the files into one)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CLIError(
            f"context file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it first"
        ) from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CLIError(
                f"context file {path} is not valid JSON ({exc}); rename it to .txt to read it as text"
            ) from None
        if not isinstance(data, (list, dict, str)):
            raise CLIError(
                f"context file {path} holds a JSON {type(data).__name__}; use a list, a dict or a string"
            )
        return data
    return text


def _load_config(args: argparse.Namespace) -> tuple[RLMConfig, dict[str, Any] | None]:
    sim_table: dict[str, Any] | None = None
    if args.config:
        path = Path(args.config)
        if not path.exists():
            raise CLIError(f"config file {path} does not exist; see configs/ for one per provider")
        config = RLMConfig.from_toml(path)
        sim_table = tomllib.loads(path.read_text(encoding="utf-8")).get("sim")
    else:
        from ._config import ModelConfig

        config = RLMConfig(root=ModelConfig(model="gpt-5-mini"))
    changes: dict[str, Any] = {}
    if args.max_depth is not None:
        changes["max_depth"] = args.max_depth
    if args.max_iterations is not None:
        changes["max_iterations"] = args.max_iterations
    if args.journal:
        changes["journal_path"] = args.journal
    if getattr(args, "isolation", None):  # `run --isolation`; `batch` shares this builder
        changes["sandbox"] = dataclasses.replace(config.sandbox, isolation=args.isolation)
    budget_changes: dict[str, Any] = {}
    if args.budget_usd is not None:
        budget_changes["max_usd"] = args.budget_usd
    if args.timeout is not None:
        budget_changes["max_seconds"] = args.timeout
    if budget_changes:
        changes["budget"] = dataclasses.replace(config.budget, **budget_changes)
    return (dataclasses.replace(config, **changes) if changes else config), sim_table


def _point_at(config: RLMConfig, base_url: str) -> RLMConfig:
    def fix(m: Any) -> Any:
        return (
            dataclasses.replace(m, base_url=base_url) if m is not None and m.base_url == _SIM_BASE_URL else m
        )

    return dataclasses.replace(
        config,
        root=fix(config.root),
        sub=fix(config.sub),
        depth_models=tuple(fix(m) for m in config.depth_models),
        others=tuple(fix(m) for m in config.others),
    )


async def _run(args: argparse.Namespace) -> int:
    from ._progress import LiveProgress
    from ._rlm import RLM
    from ._trace import TraceWriter

    context = _read_context(args.context)
    config, sim_table = _load_config(args)
    on_sim = any(m.base_url == _SIM_BASE_URL for m in config.all_models())
    async with AsyncExitStack() as stack:
        if on_sim:
            from .sim import SimConfig, SimServer

            sim = await stack.enter_async_context(
                SimServer(SimConfig.from_dict(sim_table or {}, source=args.config or "sim"))
            )
            config = _point_at(config, sim.base_url)
        sinks: list[_events.EventSink] = []
        if args.trace:
            sinks.append(stack.enter_context(TraceWriter(args.trace)))
        sinks.append(stack.enter_context(LiveProgress(quiet=args.quiet or args.json)))
        rlm = await stack.enter_async_context(RLM(config=config))
        result = await rlm.acompletion(context, args.query, event_sinks=sinks)
    if result.status == "error" and result.response is None and not args.json:
        # The run could not get going (endpoint down, model unknown, key refused): one line.
        raise CLIError(result.detail or "the run failed")
    _print_result(result, as_json=args.json)
    if on_sim and not args.json:
        _print_sim_note(result)
    return 0 if result.status in ("ok", "max_iterations") else 1


def _print_result(result: RLMResult, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    print(result.response if result.response is not None else "(no answer)")
    if result.status != "ok":
        print(f"[{result.status}] {result.detail}", file=sys.stderr)
    if result.usage_estimated:
        print(
            "[usage estimated] the server reported no usage for some calls: they are counted at their "
            "reservation, an upper bound",
            file=sys.stderr,
        )
    t = result.total
    print(
        f"[{t.calls} calls ({t.journal_hits} from the journal), {t.prompt_tokens:,} prompt tokens ({t.cached_tokens:,} cached), "
        f"{t.completion_tokens:,} completion tokens, ${t.cost_usd:.4f}, {result.execution_time:.2f} s]",
        file=sys.stderr,
    )


def _print_sim_note(result: RLMResult) -> None:
    """Say that the simulator answered, so no one mistakes it for a model."""
    from .sim import NOT_AN_ANSWER

    if result.response is not None and NOT_AN_ANSWER in str(result.response):
        print(
            "[simulator: this is NOT an answer. The bundled simulator is a scripted stand-in, not a "
            "model; it answers only the synthetic workloads' questions (try `rlm-async demo`). "
            "Point --config at a real model (configs/openai.toml, vllm.toml, ...) to answer this.]",
            file=sys.stderr,
        )
    else:
        print(
            "[answered by the bundled simulator (rlm_async.sim), a scripted stand-in, not a model]",
            file=sys.stderr,
        )


# ---------------------------------------------------------------------- batch
async def _batch(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ._governor import BudgetLimits
    from ._rlm import RLM
    from .batch import DEFAULT_MAX_CONTEXT_CHARS, BatchProgress, render_summary, run_file

    source = Path(args.input)
    if not await anyio.Path(source).is_file():
        raise CLIError(f"batch input {source} does not exist; pass a .jsonl or .csv file")
    out_dir = Path(args.out).parent
    if not await anyio.Path(out_dir).is_dir():
        raise CLIError(f"--out {args.out}: the directory {out_dir} does not exist; create it first")
    if args.concurrency < 1:
        raise CLIError(f"--concurrency is {args.concurrency}; use at least 1")
    # --budget-* cap the batch, not each query: per-query caps come from the config.
    plain = argparse.Namespace(
        config=args.config, max_depth=None, max_iterations=None, journal=None, budget_usd=None, timeout=None
    )
    config, sim_table = _load_config(plain)
    if args.journal:
        # Resuming a batch means replaying it as it went, sampled calls included.
        config = dataclasses.replace(config, journal_path=args.journal, journal_reuse_nondeterministic=True)
    budget = BudgetLimits(max_usd=args.budget_usd, max_total_tokens=args.budget_tokens)
    console = Console(stderr=True)
    async with AsyncExitStack() as stack:
        if any(m.base_url == _SIM_BASE_URL for m in config.all_models()):
            from .sim import SimConfig, SimServer

            sim = await stack.enter_async_context(SimServer(SimConfig.from_dict(sim_table or {})))
            config = _point_at(config, sim.base_url)
        progress = stack.enter_context(BatchProgress(total=0, console=console, quiet=args.quiet or args.json))
        if args.ray is not None:
            summary, figures = await _batch_on_ray(args, config, source, budget, progress)
            extra: dict[str, Any] = {"ray": figures.to_dict()}
            if args.json:
                print(json.dumps({**summary.to_dict(), **extra}, indent=2))
            else:
                console.print(render_summary(summary))
            return int(summary.exit_code)
        rlm = await stack.enter_async_context(RLM(config=config))
        summary = await run_file(
            rlm,
            source,
            Path(args.out),
            concurrency=args.concurrency,
            budget=budget,
            max_context_chars=args.max_context_chars or DEFAULT_MAX_CONTEXT_CHARS,
            progress=progress,
            handle_sigint=True,
        )
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        console.print(render_summary(summary))
    return summary.exit_code


async def _batch_on_ray(
    args: argparse.Namespace, config: RLMConfig, source: Path, budget: Any, progress: Any
) -> tuple[Any, Any]:
    resources: dict[str, float] = {}
    if args.ray_resources:
        try:
            resources = {str(k): float(v) for k, v in json.loads(args.ray_resources).items()}
        except (ValueError, AttributeError, TypeError):
            raise CLIError(
                f"--ray-resources is not a JSON object of numbers: {args.ray_resources!r}; e.g. '{{\"rlm_query\": 1}}'"
            ) from None
    if args.ray_actors < 1:
        raise CLIError(f"--ray-actors is {args.ray_actors}; use at least 1")
    address = None if args.ray == "local" else args.ray
    if importlib.util.find_spec("ray") is None:
        raise CLIError('--ray needs Ray: pip install "rlm-async[ray]"')
    from .ray import local_token

    with ExitStack() as stack:
        if address is None:  # Ray's token for it in a temporary file, never ~/.ray (see ray/_local.py)
            stack.enter_context(local_token())
        return await _run_on_ray(args, config, source, budget, progress, address, resources)


async def _run_on_ray(
    args: argparse.Namespace,
    config: RLMConfig,
    source: Path,
    budget: Any,
    progress: Any,
    address: str | None,
    resources: dict[str, float],
) -> tuple[Any, Any]:
    """Join the Ray at `address` (None: start one here), run the batch, leave it."""
    import ray

    from .batch import DEFAULT_MAX_CONTEXT_CHARS
    from .ray import run_file_ray

    def connect() -> None:
        if address is None:
            # "local", not None: None would join the cluster a `ray start` on this machine
            # left in /tmp/ray (or RAY_ADDRESS) instead of starting one.
            ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)

    try:
        connect()  # on the main thread (Ray installs its signal handlers there); nothing else runs yet
    except ConnectionError as exc:
        raise CLIError(
            f"cannot reach the Ray cluster at {args.ray} ({exc}); start one with `ray start --head`"
        ) from None
    # Ray's own messages (a node died, a worker's log) go to this process' stdout, where
    # they would break --json: send them to stderr while Ray runs.
    real_stdout = os.dup(1)
    sys.stdout.flush()
    os.dup2(2, 1)
    try:
        return await run_file_ray(
            config,
            source,
            Path(args.out),
            actors=args.ray_actors,
            concurrency=args.concurrency,
            budget=budget,
            journal_path=Path(args.journal) if args.journal else None,
            max_context_chars=args.max_context_chars or DEFAULT_MAX_CONTEXT_CHARS,
            progress=progress,
            actor_options={"resources": resources} if resources else None,
        )
    finally:
        ray.shutdown()
        sys.stdout.flush()
        os.dup2(real_stdout, 1)
        os.close(real_stdout)


# ---------------------------------------------------------------------- demo
async def _demo(args: argparse.Namespace) -> int:
    from ._progress import LiveProgress
    from ._trace import TraceWriter
    from .demo import run_demo

    with ExitStack() as stack:
        sinks: list[_events.EventSink] = []
        if args.trace:
            sinks.append(stack.enter_context(TraceWriter(args.trace)))
        if not args.json:
            print(
                f"rlm-async demo: {args.task} over a {args.tokens}-token synthetic context, "
                f"{args.chunks} chunks, on the simulator (no key, no network)",
                file=sys.stderr,
            )
        sinks.append(stack.enter_context(LiveProgress(quiet=args.quiet or args.json)))
        report = await run_demo(
            task=args.task, tokens=args.tokens, chunks=args.chunks, seed=args.seed, event_sinks=sinks
        )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0 if report.correct else 1
    r = report.result
    t = r.total
    rows = [
        ("query", report.query if len(report.query) < 100 else report.query[:97] + "..."),
        ("answer", str(r.response)),
        ("right answer", str(report.truth)),
        ("correct", "yes" if report.correct else "NO"),
        ("status", r.status),
        ("calls", f"{t.calls} ({report.requests} HTTP requests, peak {report.peak_in_flight} in flight)"),
        (
            "tokens",
            f"{t.prompt_tokens:,} prompt ({t.cached_tokens:,} cached), {t.completion_tokens:,} completion",
        ),
        ("simulated cost", f"${t.cost_usd:.4f} (stand-in prices, see rlm_async/demo.py)"),
        ("wall time", f"{r.execution_time:.2f} s"),
        (
            # Not the trace's "critical path" (the measured chain of this run): the least wall
            # time the simulator's latency model allows for the requests it served.
            "lower bound",
            f"{report.bound_s:.2f} s, the least wall time the simulator's latency model allows "
            f"(wall / bound = {r.execution_time / report.bound_s:.2f})"
            if report.bound_s
            else "n/a",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:>{width}}  {value}")
    return 0 if report.correct else 1


# ---------------------------------------------------------------------- entry
def _configure_logging(debug: bool) -> None:
    """Logs go to stderr (stdout carries the answer or --json), as JSON off a terminal."""
    import logging

    import structlog

    renderer: Any = (
        structlog.dev.ConsoleRenderer() if sys.stderr.isatty() else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if debug else logging.WARNING),
        # Resolve sys.stderr when a logger is made, not once here: whoever swaps stderr
        # (a test harness, an embedding app) must not leave us writing to a closed file.
        logger_factory=lambda *args: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging(args.debug)
    try:
        return _dispatch(args)
    except BaseException as raised:
        if args.debug and not isinstance(raised, SystemExit):
            # The traceback, then the same one line and exit code as without --debug.
            traceback.print_exception(raised, file=sys.stderr)
        # Task groups (the in-process simulator's, say) wrap what the run raised in an
        # ExceptionGroup: report a lone error as itself.
        exc = _lone(raised)
        if isinstance(exc, (CLIError, RLMError)):
            kind = "configuration error" if isinstance(exc, ConfigError) else "error"
            print(f"rlm-async: {kind}: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, KeyboardInterrupt):
            print("rlm-async: interrupted", file=sys.stderr)
            return 130
        if not isinstance(exc, Exception):
            raise
        hint = "" if args.debug else " (run with --debug for the traceback)"
        print(f"rlm-async: unexpected {type(exc).__name__}: {exc}{hint}", file=sys.stderr)
        return 1


def _trace_view(path: Path, output: str | None) -> int:
    from .trace_view import main_view

    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise CLIError(
            f"trace file {path} {what}; pass one query's trace: `rlm-async run --trace DIR` and "
            "`rlm-async serve --trace DIR` write DIR/<query_id>.jsonl"
        )
    try:
        out = main_view(path, output)
    except ValueError as exc:  # not a trace, or a format version this release does not read
        raise CLIError(str(exc)) from None
    print(f"wrote {out}")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "sim":
        from .sim.server import run_from_args

        return run_from_args(args)
    if args.command == "trace":
        return _trace_view(Path(args.trace_path), args.output)
    if args.command == "doctor" and args.sandbox:
        return _loop.run(_sandbox_doctor, args.isolation, args.json)
    if args.command == "serve":
        from .serve import load_serve_config, run_server

        config = load_serve_config(
            args.config, host=args.host, port=args.port, otel=args.otel, trace_dir=args.trace
        )

        def ready(url: str, note: str) -> None:
            print(f"rlm-async serve: listening on {url} ({note})", file=sys.stderr, flush=True)

        _loop.run(functools.partial(run_server, config, on_ready=ready))
        return 0
    runner = {"run": _run, "batch": _batch, "doctor": _doctor}.get(args.command, _demo)
    return _loop.run(runner, args)


async def _doctor(args: argparse.Namespace) -> int:
    from ._config import ModelConfig
    from ._servers import diagnose, report
    from .transport import OpenAITransport, Transport

    config = (
        RLMConfig.from_toml(args.config) if args.config else RLMConfig(root=ModelConfig(model="gpt-5-mini"))
    )
    models = [m for m in config.all_models() if m.base_url != _SIM_BASE_URL]
    opened: list[Transport] = []

    def transport_for(m: Any) -> Transport:
        try:
            opened.append(OpenAITransport(m.base_url, api_key_env=m.api_key_env))
        except MissingAPIKey as exc:
            if args.config:
                raise
            # With no --config this checks OpenAI's defaults, which a first try rarely means.
            raise CLIError(
                f"{exc}; or check the bundled simulator and this machine's sandbox with "
                "`rlm-async doctor --config configs/sim.toml`, or the sandbox alone with `--sandbox`"
            ) from None
        return opened[-1]

    try:
        settings = await diagnose(models, transport_for)
    finally:
        for t in opened:
            await t.aclose()
    if args.json:
        print(json.dumps([s.event_fields() for s in settings], indent=2))
        return 0
    print("\n".join(report(settings)))
    print(f"event loop: {_loop.loop_name()} (set {_loop.ENV}=asyncio or uvloop to choose)")
    print()
    return await _sandbox_doctor(args.isolation, False)


async def _sandbox_doctor(isolation: str, as_json: bool) -> int:
    """Which isolation tiers work here, the one model code would get, and a worker started
    under it; 2 when none can run (the engine would refuse)."""
    found = await diagnose_sandbox(SandboxConfig(isolation=isolation))  # type: ignore[arg-type]
    print(json.dumps(found.to_dict(), indent=2) if as_json else render_sandbox(found))
    return 0 if found.chosen is not None and not (found.worker_check or "").startswith("FAILED") else 2


def _lone(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
