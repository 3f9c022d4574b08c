"""docs/batch.md runs as written: its python and bash blocks, in order, in a fresh folder
holding a copy of configs/ (the simulator's config starts the simulator in-process)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```$", re.M | re.S)


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer((ROOT / "docs" / "batch.md").read_text())]


class TestBatchDocs:
    def test_every_example_runs(self, tmp_path: Path) -> None:
        """Each python and bash block of docs/batch.md exits 0, run in order in one folder."""
        shutil.copytree(ROOT / "configs", tmp_path / "configs")
        found = blocks()
        assert [kind for kind, _ in found].count("bash") >= 3 and len(found) >= 5
        bindir = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
        for kind, code in found:
            command = [sys.executable, "-c", code] if kind == "python" else ["bash", "-ec", code]
            done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170)
            assert done.returncode == 0, f"{kind} block failed:\n{code}\n{done.stdout}\n{done.stderr}"
