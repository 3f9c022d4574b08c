"""A live `rlm-async serve` in a child process on loopback, for the service's end-to-end
tests: started with a config file written from a template, read back its port from the
"listening on" line, stopped with SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rlm_async.sandbox import _procs as procs

# Fast simulated models: the tests measure behaviour, not latency.
BASE_CONFIG = """
[rlm]
max_depth = 1
max_iterations = 6

[root]
model = "sim-model"
base_url = "sim"
api_key_env = ""
max_tokens = 2048
prices = { input_per_mtok = 1.25, cached_input_per_mtok = 0.125, output_per_mtok = 10.0 }

[sub]
model = "sim-mini"
base_url = "sim"
api_key_env = ""
max_tokens = 256
prices = { input_per_mtok = 0.25, cached_input_per_mtok = 0.025, output_per_mtok = 2.0 }

[governor]
chars_per_token = 4.0

[budget]
max_usd = 1.0

[sim]
seed = 0
models = ["sim-model", "sim-mini"]

[sim.latency.root]
ttft_s = @ROOT_TTFT@
output_s_per_token = 0.0

[sim.latency.sub]
ttft_s = @SUB_TTFT@
output_s_per_token = 0.0

[sim.policies.root]
name = "rlm"
chunks = @CHUNKS@
"""

_READY = re.compile(r"listening on (http://\S+/v1)")
_PRIVATE_UID_LOW = 0x70000000
"""Where the sandbox picks its workers' private uids (`rlm_async.sandbox._procs`)."""


def config_text(
    *, serve: str = "", root_ttft: float = 0.02, sub_ttft: float = 0.02, chunks: int = 4, pool: int = 0
) -> str:
    """A config file's text. `pool`: `[serve] worker_pool` (0 here unless a test asks, so a
    server's child processes are its queries' workers, which tests count)."""
    text = (
        BASE_CONFIG.replace("@ROOT_TTFT@", str(root_ttft))
        .replace("@SUB_TTFT@", str(sub_ttft))
        .replace("@CHUNKS@", str(chunks))
    )
    return f"[serve]\nworker_pool = {pool}\n" + serve + "\n" + text


class ServerProcess:
    """`with ServerProcess(config_text(...)) as server: server.base_url`."""

    def __init__(
        self,
        config: str,
        *,
        env: dict[str, str] | None = None,
        data_dir: str | None = None,
        program: list[str] | None = None,
    ) -> None:
        self._program = program or [sys.executable, "-m", "rlm_async.cli"]
        """What runs the CLI: `rlm_async.cli` itself, or a script that sets up the process
        first and then calls `rlm_async.cli.main` with the same arguments."""
        self._tmp = Path(tempfile.mkdtemp(prefix="rlm-serve-test-"))
        self.config_path = self._tmp / "serve.toml"
        if data_dir is not None:
            config = config.replace("[serve]\n", f'[serve]\ndata_dir = "{data_dir}"\n', 1)
            if "[serve]" not in config:
                config = f'[serve]\ndata_dir = "{data_dir}"\n' + config
        self.config_path.write_text(config)
        self._env = {k: v for k, v in os.environ.items() if k != "RLM_SERVE_KEYS"}
        self._env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self.root_url = ""
        self.stderr_path = self._tmp / "stderr.log"
        self.banner = ""

    def start(self) -> ServerProcess:
        self._stderr = open(self.stderr_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [
                *self._program,
                "serve",
                "--config",
                str(self.config_path),
                "--port",
                "0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            env=self._env,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = self.stderr_path.read_text(errors="replace")
            found = _READY.search(text)
            if found:
                self.banner = text
                self.base_url = found.group(1)
                self.root_url = self.base_url.removesuffix("/v1")
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {text[-3000:]}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("the server did not start within 60 s")

    def children(self) -> list[int]:
        """Pids of every live descendant of the server (its REPL workers)."""
        assert self.proc is not None
        server = self.proc.pid
        tree = procs.survivors(root=server, group=None, uid=None)  # the sandbox's own /proc walk
        return [p.pid for p in tree if p.pid != server and p.state not in ("Z", "X")]

    def worker_uids(self) -> set[int]:
        """The private uids the server's live workers run as (the engine is root): a
        process of the worker that left the server's tree (re-parented to init after its
        parent died) still has one, so `running_as` finds it anywhere on the host. Empty
        where workers keep the engine's uid."""
        assert self.proc is not None
        tree = procs.survivors(root=self.proc.pid, group=None, uid=None)
        return {p.uid for p in tree if p.uid >= _PRIVATE_UID_LOW and p.state not in ("Z", "X")}

    def running_as(self, uids: set[int], timeout_s: float = 20.0) -> list[int]:
        """Pids of live processes anywhere on the host with one of `uids`, once none is
        left or `timeout_s` has passed (the last ones seen)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = [p.pid for p in procs.scan() if p.uid in uids and p.state not in ("Z", "X")]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.05)

    def wait_no_children(self, timeout_s: float = 20.0) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while True:
            left = self.children()
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.05)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=90)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "_stderr", None) is not None:
            self._stderr.close()

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
