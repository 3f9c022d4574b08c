"""A Ray cluster on loopback for the tests: a head and worker nodes, each a `ray start
--block` process in a session (process group) of its own, so a test can `kill -9` one
node's whole group and the teardown can stop exactly what it started (never `ray stop`,
which would stop every Ray process on the machine, another user's included).

Small settings for a shared machine: one CPU a node, a small object store, no dashboard,
127.0.0.1 only. The head checks node health every second and calls a node dead after 4
misses, so a killed node's actors fail in seconds rather than half a minute.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["RayCluster"]

RAY = str(Path(sys.executable).with_name("ray"))
STORE_BYTES = 80 * 1024 * 1024
FAST_DEATH = {
    "RAY_health_check_initial_delay_ms": "2000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "4",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RayCluster:
    """`with RayCluster(workers=2) as c: ... c.address ... c.kill_worker(0)`."""

    def __init__(
        self, *, workers: int = 2, worker_resource: str = "rlm_query", start_timeout_s: float = 120.0
    ) -> None:
        self.workers = workers
        self.worker_resource = worker_resource
        self.start_timeout_s = start_timeout_s
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Ray's socket paths must stay short: a short folder directly under /tmp.
        self.tmp = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.env = {**os.environ, **FAST_DEATH, "RAY_USAGE_STATS_ENABLED": "0"}

    def _start(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        self.logs.append(self.tmp / log)
        with (self.tmp / log).open("wb") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [RAY, "start", "--block", "--disable-usage-stats", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def __enter__(self) -> RayCluster:
        try:
            common = [
                "--num-cpus=1",
                f"--object-store-memory={STORE_BYTES}",
                "--node-ip-address=127.0.0.1",
            ]
            self._start(
                [
                    "--head",
                    f"--port={self.port}",
                    "--include-dashboard=false",
                    # Fixed default ports (8265, 52365) would collide with another cluster here.
                    f"--dashboard-port={_free_port()}",
                    f"--dashboard-agent-listen-port={_free_port()}",
                    f"--temp-dir={self.tmp / 'ray'}",
                    *common,
                ],
                "head.log",
            )
            self._wait_nodes(1)
            for i in range(self.workers):
                self._start(
                    [
                        f"--address={self.address}",
                        f'--resources={{"{self.worker_resource}": 100}}',
                        f"--dashboard-agent-listen-port={_free_port()}",
                        *common,
                    ],
                    f"worker{i}.log",
                )
                self._wait_nodes(2 + i)  # one at a time: two nodes starting together on one IP collide
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_nodes(self, n: int) -> None:
        """Until `ray status` counts `n` live nodes (or the timeout: then it raises)."""
        give_up = time.monotonic() + self.start_timeout_s
        last = ""
        while time.monotonic() < give_up:
            for p, log in zip(self.procs, self.logs, strict=True):
                if p.poll() is not None:
                    tail = log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"a ray node exited at start ({p.args!r}):\n{tail}")
            done = subprocess.run(
                [RAY, "status", f"--address={self.address}"],
                capture_output=True,
                text=True,
                env=self.env,
                timeout=60,
            )
            last = done.stdout + done.stderr
            if done.returncode == 0 and last.count(" node_") >= n:
                return
            time.sleep(1.0)
        raise RuntimeError(f"the Ray cluster did not reach {n} nodes: {last[-2000:]}")

    def workers_running(self, marker: str) -> list[int]:
        """Worker nodes with a process whose command line contains `marker` (Ray titles an
        actor's process "ray::ClassName"). A process belongs to the node whose `ray start`
        process group holds it or one of its ancestors: Ray may start workers in process
        groups of their own."""
        groups = {self.procs[1 + i].pid: i for i in range(self.workers)}
        parents: dict[int, int] = {}
        marked: list[int] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), 0)
            parents[int(entry.name)] = ppid
            if marker.encode() in cmdline:
                marked.append(int(entry.name))
        found: set[int] = set()
        for pid in marked:
            seen = 0
            while pid > 1 and seen < 64:  # bounded: a pid reused mid-walk cannot loop forever
                try:
                    pgid = os.getpgid(pid)
                except ProcessLookupError:
                    break
                if pgid in groups:
                    found.add(groups[pgid])
                    break
                pid, seen = parents.get(pid, 0), seen + 1
        return sorted(found)

    def kill_worker(self, i: int) -> None:
        """`kill -9` worker node `i`'s process group: its raylet and every worker process."""
        proc = self.procs[1 + i]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop(self) -> None:
        """Stop every node this cluster started: SIGTERM its group, then SIGKILL."""
        for proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.stop()
