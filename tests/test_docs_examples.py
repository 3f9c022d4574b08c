"""Every shell and Python example a user would copy from README.md and docs/**/*.md runs, as
written, against the bundled simulator: a block that exits non-zero or prints a usage error
fails its page.

Conventions (visible in each page's source, as an HTML comment on the line before a fence):

- ```` ```bash ```` / ```` ```sh ```` / ```` ```console ```` blocks run with `bash -euo pipefail`,
  ```` ```python ```` blocks with this interpreter; any other language (toml, text,
  dockerfile, none) is not run.
- ``<!-- not run: REASON -->``: not run, for a block that needs what a test machine has not
  (an API key, a provider's server, Docker) or takes minutes (a benchmark). The reason is
  required; such blocks should be few.
- ``<!-- run in the background -->``: a server (the simulator). It is started, the test waits
  for the ``--port`` it names to accept connections, and it is stopped when the page ends.
  A page reads naturally with a fixed port (``--port 8412``), but each run gives the server
  a free one: the port a background block names is replaced, in every block of its page,
  by one the kernel just handed out, so two test runs on one machine never meet.
- ``<!-- run in the repository root -->``: runs in the checkout itself (the README's install
  command); every other block runs in a scratch directory per page where ``configs/`` is
  the checkout's, so files the examples write land there.

The blocks of a page run in order and share their scratch directory, so a page may write
a file in one block and read it in the next. The interpreter's directory (the venv's bin)
leads PATH, so ``rlm-async`` and ``python`` are this checkout's.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
SHELLS = {"bash", "sh", "shell", "console"}
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"^<!--\s*(.*?)\s*-->$")
_USAGE_ERRORS = ("usage:", "unrecognized arguments", "invalid choice", "Traceback")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    code: str
    marker: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        start, lang = i, m.group(1)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = _MARKER.match(before)
        found.append(
            Block(page, start + 1, lang, "\n".join(lines[start + 1 : end]), marker.group(1) if marker else "")
        )
        i = end + 1
    return found


def runnable(block: Block) -> bool:
    return (block.lang in SHELLS or block.lang == "python") and not block.marker.startswith("not run")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["NO_COLOR"] = "1"
    return env


def _argv(block: Block) -> list[str]:
    if block.lang == "python":
        return [sys.executable, "-c", block.code]
    return ["bash", "-euo", "pipefail", "-c", block.code]


def _free_ports(todo: list[Block]) -> dict[str, str]:
    """Each port a background block of the page names -> a free loopback port for this run."""
    ports: dict[str, str] = {}
    for b in todo:
        if b.marker == "run in the background":
            named = re.search(r"--port (\d+)", b.code)
            assert named, f"{b.where}: a background block names its --port"
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))  # closed at once: the server binds it next
                ports[named.group(1)] = str(s.getsockname()[1])
    return ports


def _with_ports(block: Block, ports: dict[str, str]) -> Block:
    code = block.code
    for written, free in ports.items():
        code = re.sub(rf"(?<!\d){written}(?!\d)", free, code)
    return replace(block, code=code)


def _wait_for_port(port: int, proc: subprocess.Popen[str], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the background block exited with {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing listened on port {port} within {timeout_s} s")


class TestConventions:
    def test_every_not_run_block_gives_a_reason_and_they_are_few(self) -> None:
        """A skipped block says why; runnable blocks far outnumber skipped ones."""
        all_blocks = [b for page in PAGES for b in blocks(page) if b.lang in SHELLS or b.lang == "python"]
        skipped = [b for b in all_blocks if b.marker.startswith("not run")]
        for b in skipped:
            assert re.match(r"not run: \S", b.marker), f"{b.where}: say why it is not run"
        assert len(skipped) * 2 < len(all_blocks), [b.where for b in skipped]

    def test_the_readme_test_command_is_the_ci_script(self) -> None:
        """README's test command is `bash scripts/test`, which .ci/run runs, and whose apt
        line installs without recommends: the README and CI cannot drift."""
        readme = (REPO / "README.md").read_text(encoding="utf-8")
        assert "```bash\nbash scripts/test\n```" in readme
        assert "scripts/test" in (REPO / ".ci" / "run").read_text(encoding="utf-8")
        script = (REPO / "scripts" / "test").read_text(encoding="utf-8")
        assert "apt-get install -y -qq --no-install-recommends" in script
        assert "sudo apt-get" not in readme

    def test_each_run_gives_a_background_server_a_free_port(self) -> None:
        """The serving page's server and every block that reaches it use a port free for
        this run, never the fixed one the page shows."""
        todo = [b for b in blocks(REPO / "docs" / "serve.md") if runnable(b)]
        ports = _free_ports(todo)
        assert list(ports) == ["8412"] and ports["8412"] != "8412"
        ported = [_with_ports(b, ports) for b in todo]
        assert not any("8412" in b.code for b in ported)
        reaching = [b for b in ported if ports["8412"] in b.code]
        assert len(reaching) == sum("8412" in b.code for b in todo) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_examples_run(page: Path, tmp_path: Path) -> None:
    """Each runnable block of the page exits 0 without a usage error, in order."""
    todo = [b for b in blocks(page) if runnable(b)]
    if not todo:
        pytest.skip("no runnable examples on this page")
    ports = _free_ports(todo)
    todo = [_with_ports(b, ports) for b in todo]
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = _env()
    background: list[subprocess.Popen[str]] = []
    try:
        for b in todo:
            cwd = REPO if b.marker == "run in the repository root" else tmp_path
            if b.marker == "run in the background":
                port = re.search(r"--port (\d+)", b.code)
                assert port, f"{b.where}: a background block names its --port"
                proc = subprocess.Popen(
                    _argv(b), cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    text=True, start_new_session=True,
                )  # fmt: skip
                background.append(proc)
                _wait_for_port(int(port.group(1)), proc)
                continue
            done = subprocess.run(_argv(b), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
            output = done.stdout[-3000:] + done.stderr[-3000:]
            assert done.returncode == 0, f"{b.where} exited {done.returncode}:\n{output}"
            for bad in _USAGE_ERRORS:
                assert bad not in done.stderr, f"{b.where} printed {bad!r}:\n{output}"
    finally:
        for proc in background:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
