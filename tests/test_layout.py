"""The seams the code promises: registries, a typed stage contract, stages that import no
sibling stage, and an install that ships every package."""

import ast

import pytest
from conftest import REPO

from compressor.exporters import EXPORTERS
from compressor.exporters.base import Exporter
from compressor.stages import STAGES, StageKind
from compressor.teachers import SOURCES, Source


def test_registries_hold_implementations_of_their_contracts():
    assert all(isinstance(s, StageKind) for s in STAGES.values())
    assert all(issubclass(s, Source) and s.prefix == p for p, s in SOURCES.items())
    assert all(isinstance(e, Exporter) and e.name == n for n, e in EXPORTERS.items())


def test_no_stage_imports_another_stage():
    stages = {p.stem for p in (REPO / "compressor" / "stages").glob("*.py")} - {"__init__", "base"}
    for path in (REPO / "compressor" / "stages").glob("*.py"):
        if path.stem == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import ...
                assert node.module in (None, "base") or node.module not in stages, f"{path.name} imports {node.module}"
                assert node.module is not None, f"{path.name}: `from . import` of a sibling"


def test_pyproject_ships_every_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "compressor").rglob("__init__.py")} | {
        "compressor.evals"
    }
    assert set(config["packages"]) == folders
    assert config["package-dir"]["compressor.evals"] == "evals" and list((REPO / "evals").glob("*.yaml"))
