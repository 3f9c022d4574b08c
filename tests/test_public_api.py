"""The public surface: a curated, sorted __all__, and layers that import only downward."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import rlm_async
import rlm_async.testing

PACKAGE = Path(rlm_async.__file__).parent
BOOTSTRAP = PACKAGE / "sandbox" / "_bootstrap.py"
"""Runs inside the sandbox as a script, where nothing of rlm_async is importable."""

# Lower number = lower layer. A module may import only from its own layer or below.
LAYERS: dict[str, int] = {
    "_types": 0,
    "_text": 0,
    "_checks": 0,
    "_prompt_batch": 0,
    "_version": 0,
    "exceptions": 0,
    "_events": 0,
    "_prompts": 0,
    "_context": 0,
    "_parsing": 0,
    "workloads": 0,
    "_descriptors": 0,
    "_sockets": 0,
    "_gc": 0,
    "_loop": 0,
    "_wire": 0,
    "transport": 1,
    "_governor": 2,
    "_cache": 2,
    "_journal": 2,
    "testing": 3,
    "sandbox": 3,
    "_tree": 3,
    "_result": 3,
    "_trace": 3,
    "_trace_summary": 3,
    "_trace_spans": 3,
    "_trace_path": 3,
    "_progress": 3,
    "hooks": 3,
    "logger": 3,
    "trace_view": 3,
    "_tools": 3,
    "_official_prompts": 3,
    "_config": 4,
    "_servers": 4,
    "_engine": 5,
    "_rlm": 6,
    "_session": 6,
    "batch": 6,
    "ray": 7,
    "sim": 7,
    "demo": 8,
    "serve": 8,
    "cli": 9,
    "__init__": 9,
}


def _layer(module: str) -> int:
    top = module.split(".")[0]
    if top not in LAYERS:
        raise AssertionError(f"module {module!r} has no layer in tests/test_public_api.py: add it")
    return LAYERS[top]


def _internal_imports(path: Path) -> list[str]:
    rel = path.relative_to(PACKAGE).with_suffix("")
    package_parts = list(rel.parts[:-1])
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package_parts[: len(package_parts) - (node.level - 1)]
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            if target:
                found.append(target)
            else:  # `from . import x`
                found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlm_async."):
            found.append(node.module.removeprefix("rlm_async."))
        elif isinstance(node, ast.Import):
            found.extend(
                a.name.removeprefix("rlm_async.") for a in node.names if a.name.startswith("rlm_async.")
            )
    return found


class TestExports:
    def test_all_is_sorted(self) -> None:
        """__all__ is sorted (case-sensitively, as ruff's RUF022 sorts), so additions are reviewed."""
        names = [n for n in rlm_async.__all__ if n != "__version__"]
        assert names == sorted(names, key=lambda n: (not n.isupper(), n))

    def test_every_name_is_importable(self) -> None:
        """Every exported name exists on the package."""
        for name in rlm_async.__all__:
            assert hasattr(rlm_async, name), name

    def test_testing_exports_its_doubles(self) -> None:
        """`rlm_async.testing` has a sorted __all__ naming importable doubles, capture_events among them."""
        names = rlm_async.testing.__all__
        assert names == sorted(names) and "capture_events" in names
        assert all(hasattr(rlm_async.testing, name) for name in names)

    def test_official_entry_points(self) -> None:
        """The official package's entry points exist under the same names."""
        rlm = rlm_async.RLM
        assert callable(rlm.completion) and callable(rlm.acompletion)


class TestLayers:
    def test_layers_import_only_downward(self) -> None:
        """No module imports from a layer above its own (types < transport < governor < engine < cli)."""
        violations = []
        for path in PACKAGE.rglob("*.py"):
            rel = path.relative_to(PACKAGE).with_suffix("")
            if path == BOOTSTRAP:
                continue  # runs inside the sandbox and imports nothing of ours (checked below)
            module = ".".join(rel.parts)
            own = _layer(module)
            for target in _internal_imports(path):
                if _layer(target) > own:
                    violations.append(f"{module} (layer {own}) imports {target} (layer {_layer(target)})")
        assert violations == []

    def test_worker_bootstrap_imports_only_the_stdlib(self) -> None:
        """The worker bootstrap runs inside the sandbox, where rlm_async is not importable."""
        assert _internal_imports(BOOTSTRAP) == []
        tree = ast.parse(BOOTSTRAP.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(not a.name.startswith("rlm_async") for a in node.names)

    def test_the_sandbox_is_reached_only_through_its_public_face(self) -> None:
        """Outside rlm_async/sandbox/, no module imports a private module of the sandbox."""
        offenders = []
        for path in PACKAGE.rglob("*.py"):
            rel = path.relative_to(PACKAGE).with_suffix("")
            if rel.parts[0] == "sandbox":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom):
                    names = [f"{node.module or ''}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                offenders += [f"{'.'.join(rel.parts)}: {n}" for n in names if "sandbox._" in n]
        assert offenders == []

    def test_only_transport_imports_the_wire_libraries(self) -> None:
        """aiohttp, httpx and openai are imported by the transport alone (the simulator is a server)."""
        offenders = []
        for path in PACKAGE.rglob("*.py"):
            rel = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
            if rel == "transport" or rel.startswith("sim"):
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                if any(n.split(".")[0] in ("aiohttp", "httpx", "httpx_aiohttp", "openai") for n in names):
                    offenders.append(rel)
        assert offenders == []

    def test_modules_import_cleanly(self) -> None:
        """Every module imports on its own (no import cycles hidden by import order)."""
        for path in PACKAGE.rglob("*.py"):
            rel = path.relative_to(PACKAGE).with_suffix("")
            if path == BOOTSTRAP or rel.name == "__main__":
                continue
            importlib.import_module(".".join(["rlm_async", *rel.parts]).removesuffix(".__init__"))


class TestLayout:
    def test_the_readme_layout_names_every_module(self) -> None:
        """The README's Layout block names every module and subpackage of rlm_async, and
        nothing that is gone, so the map a new reader starts from cannot fall behind."""
        readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
        block = readme.split("## Layout", 1)[1].split("```", 2)[1]
        # Entries are indented two spaces; deeper lines continue the entry above.
        listed = {line.split()[0].rstrip("/") for line in block.splitlines() if re.match(r"  \S", line)}
        not_modules = {"__init__.py", "__pycache__", "py.typed", "prompts", "_trace_view"}
        present = {p.name for p in PACKAGE.iterdir()} - not_modules
        assert sorted(present - listed) == [], "README.md's Layout does not name these"
        assert sorted(listed - present) == [], "README.md's Layout names these, which do not exist"
