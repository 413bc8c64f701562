"""The import contracts of pyproject.toml (``[tool.importlinter]``): layers without cycles, a pure core
without torch, KV connectors that know nothing above them. They pass on the tree, and they fail when a
pure module imports torch (checked on a copy of the tree with that one line added)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(src: Path, config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(LINT), "--config", str(config), "--no-cache"], capture_output=True, text=True,
                          env=env, cwd=config.parent, timeout=300)


def test_contracts_hold_on_the_tree():
    run = _lint(ROOT / "src", ROOT / "pyproject.toml")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 kept, 0 broken" in run.stdout


def test_a_pure_module_importing_torch_breaks_the_contract(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "pdserve", src / "pdserve", ignore=shutil.ignore_patterns("__pycache__"))
    scheduler = src / "pdserve" / "engine" / "scheduler.py"
    scheduler.write_text(scheduler.read_text() + "\nimport torch  # noqa: E402\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    run = _lint(src, tmp_path / "pyproject.toml")
    assert run.returncode != 0
    assert "The pure core imports no torch" in run.stdout and "BROKEN" in run.stdout
    assert "pdserve.engine.scheduler -> torch" in run.stdout


def test_no_import_cycle_between_modules():
    """Not even inside a package (the layers contract orders packages; this orders their modules)."""
    import grimp

    graph = grimp.build_graph("pdserve", cache_dir=None)
    modules = sorted(graph.modules)
    cycles = []
    for m in modules:
        for imported in graph.find_modules_directly_imported_by(m):
            if imported != m and graph.chain_exists(importer=imported, imported=m):
                cycles.append((m, imported))
    assert not cycles, cycles[:5]
