"""The simulator in a child process: started, used over HTTP, its log read back, stopped."""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import anyio
import pytest
from conftest import descriptors_above_1023

import rlm_async
from rlm_async._types import Message, ModelRequest
from rlm_async.exceptions import ConnectionFailed
from rlm_async.sim import Faults, KindLatency, LatencyModel, SimConfig, SimProcess
from rlm_async.sim.server import build_parser, config_from_args
from rlm_async.transport import OpenAITransport


class TestSimProcess:
    @pytest.mark.anyio
    async def test_child_process_serves_its_config_and_its_log_outlives_it(self, tmp_path: Path) -> None:
        """SimProcess passes its config to the child (model names, latency), reports the port it
        chose, and the JSONL log can be read while it runs and after it stopped."""
        config = SimConfig(models=("proc-model",), latency=LatencyModel(sub=KindLatency(ttft_s=0.05)))
        async with SimProcess(config, log_path=tmp_path / "log.jsonl") as sim:
            assert sim.base_url == f"http://127.0.0.1:{sim.port}/v1"
            transport = OpenAITransport(sim.base_url)
            completion = await transport.complete(
                ModelRequest(model="proc-model", messages=(Message("user", "ping"),))
            )
            await transport.aclose()
            running = sim.read_log()
        assert completion.text == "ECHO: ping"
        assert [e.model for e in running] == ["proc-model"]
        (entry,) = sim.read_log().entries
        assert entry.finish is not None and entry.start is not None
        assert entry.outcome == "ok" and entry.finish - entry.start >= 0.049
        assert (tmp_path / "log.jsonl").exists()

    def test_runs_the_simulator_of_the_source_tree_it_is_given(self, tmp_path: Path) -> None:
        """`source`: the tree whose `rlm_async` the child imports (a benchmark's A/B of two
        versions). A copy of this package that names itself otherwise in its answers'
        `system_fingerprint` answers so; a directory without the package is refused before
        anything starts."""
        own = Path(rlm_async.__file__).resolve().parent
        shutil.copytree(own, tmp_path / "rlm_async", ignore=shutil.ignore_patterns("__pycache__"))
        app = tmp_path / "rlm_async" / "sim" / "_app.py"
        marked = app.read_text().replace(
            '"system_fingerprint": "rlm-async-sim"', '"system_fingerprint": "the-copy"'
        )
        assert marked != app.read_text()
        app.write_text(marked)
        body = json.dumps({"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]}).encode()
        with SimProcess(SimConfig(), source=tmp_path) as sim:
            assert sim.base_url is not None
            asked = urllib.request.Request(
                sim.base_url + "/chat/completions", data=body, headers={"content-type": "application/json"}
            )
            with urllib.request.urlopen(asked, timeout=10) as response:  # loopback
                assert json.loads(response.read())["system_fingerprint"] == "the-copy"
        with pytest.raises(ValueError, match="no rlm_async/sim package"):
            SimProcess(source=tmp_path / "rlm_async")

    def test_sync_context_manager_and_temporary_log(self) -> None:
        """Used synchronously without a log path, the log is kept in memory after the temp dir goes."""
        with SimProcess() as sim:
            pid = sim.pid
            assert pid is not None and sim.port is not None
        assert sim.pid is None
        assert len(sim.read_log()) == 0

    def test_starts_from_a_program_holding_descriptors_above_1023(self) -> None:
        """A load test or benchmark may hold over a thousand connections when it starts a
        simulator: waiting for its port must not use select(), which refuses them."""
        with descriptors_above_1023(), SimProcess() as sim:
            assert sim.port is not None and sim.port > 0

    @pytest.mark.anyio
    async def test_clients_that_leave_free_their_slots_in_service_and_in_the_queue(self) -> None:
        """On uvloop and httptools (the child's stack): with one slot, a 30 s request in
        service and one queued behind it are both logged "cancelled" when their clients
        leave (the queued one first, never served), and a request sent next is served at once
        (within the test's 20 s guard, not after the 30 s one)."""
        config = SimConfig(
            latency=LatencyModel(sub=KindLatency(ttft_s=0.05, capacity=1)),
            faults=Faults(script=("slow", "slow", "ok"), slow_extra_s=30.0),
        )

        def ask(i: int) -> ModelRequest:
            return ModelRequest(model="sim-model", messages=(Message("user", f"q{i}"),))

        with anyio.fail_after(20):
            async with SimProcess(config) as sim, aiohttp.ClientSession() as http:
                assert sim.base_url is not None
                health = sim.base_url.removesuffix("/v1") + "/health"

                async def in_flight() -> int:
                    async with http.get(health) as response:
                        return int((await response.json())["in_flight"])

                patient, impatient = (
                    OpenAITransport(sim.base_url),
                    OpenAITransport(sim.base_url, timeout_s=0.5),
                )
                async with anyio.create_task_group() as tg:
                    tg.start_soon(patient.complete, ask(0))  # served first, for 30 s
                    await _until(lambda: in_flight(), 1)
                    with pytest.raises(ConnectionFailed):  # queued behind it, then gone
                        await impatient.complete(ask(1))
                    await _until(lambda: _logged(sim), 1)
                    tg.cancel_scope.cancel()  # the first client leaves too
                await _until(lambda: _logged(sim), 2)
                third = await patient.complete(ask(2))
                await patient.aclose()
                await impatient.aclose()
                log = sim.read_log().by_arrival()
        assert third.text == "ECHO: q2"
        assert [e.outcome for e in log] == ["cancelled", "cancelled", "ok"]
        served, queued, last = log
        assert served.start is not None and queued.start is None and queued.prompt_tokens == 0
        assert last.start is not None and served.modeled_s is not None
        assert last.start < served.start + served.modeled_s  # the slot was freed, not served out


async def _logged(sim: SimProcess) -> int:
    return len(sim.read_log())


async def _until(count: Callable[[], Awaitable[int]], want: int) -> None:
    """Poll until `count()` reaches `want` (the caller's fail_after bounds it)."""
    for _ in range(10_000):
        if await count() >= want:
            return
        await anyio.sleep(0.02)


class TestCommandLine:
    def test_flags_override_the_config_file(self, tmp_path: Path) -> None:
        """--config reads the [sim] table; --seed, --models, --latency and policy flags override it."""
        path = tmp_path / "sim.toml"
        path.write_text('[sim]\nseed = 1\nmodels = ["x"]\n[sim.policies.root]\nname = "rlm"\nchunks = 4\n')
        args = build_parser().parse_args(
            [
                "--config",
                str(path),
                "--seed",
                "9",
                "--models",
                "a,b",
                "--latency",
                "realistic",
                "--sub-policy",
                "unhelpful",
            ]
        )
        config = config_from_args(args)
        assert config.seed == 9 and config.models == ("a", "b")
        assert config.latency == LatencyModel.realistic()
        assert config.policies.root.options == {"chunks": 4}
        assert config.policies.sub.name == "unhelpful"
