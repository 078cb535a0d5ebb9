"""The import contract: the folders are the architecture (docs/ARCHITECTURE.md, 'Allowed imports').

Every module of the layered packages is parsed, and each import of a project package is checked against
the allowed arrows.  Imports inside function bodies count too, and in the layered packages a project
import inside a function is refused outright: a cycle dodged that way is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = {"mesh", "ca", "controlplane", "nodeagent", "waypoint", "bpf", "meshctl", "localcluster", "bench",
           "examples"}
# package -> the project packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "mesh": set(),
    "bpf": set(),
    "ca": {"mesh"},
    "controlplane": {"ca", "mesh"},
    "nodeagent": {"mesh", "bpf"},
    "waypoint": {"mesh"},
    "meshctl": PROJECT,
    "localcluster": PROJECT,
    "bench": PROJECT,
    "examples": PROJECT,
}
LAYERED = {"mesh", "bpf", "ca", "controlplane", "nodeagent", "waypoint"}


def imported_packages(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """(top-level project package, line, inside a function) of every import in the module."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            for name in names:
                top = name.split(".")[0]
                if top in PROJECT:
                    found.append((top, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def violations(root: Path) -> list[str]:
    out = []
    for package, allowed in sorted(ALLOWED.items()):
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            tree = ast.parse(path.read_text(), filename=str(rel))
            for top, line, in_function in imported_packages(tree):
                if top != package and top not in allowed:
                    out.append(f"{rel}:{line}: {package} may not import {top}")
                elif in_function and package in LAYERED:
                    out.append(f"{rel}:{line}: project import inside a function body")
    return out


def test_the_tree_keeps_the_import_contract() -> None:
    assert violations(ROOT) == []


@pytest.mark.parametrize(("package", "line", "expected"), [
    ("mesh", "from meshctl.main import main", "mesh may not import meshctl"),
    ("nodeagent", "import waypoint.app", "nodeagent may not import waypoint"),
    ("waypoint", "from controlplane.translate import authz", "waypoint may not import controlplane"),
    ("ca", "from controlplane import app", "ca may not import controlplane"),
    ("controlplane", "def f():\n    from mesh import identity\n", "project import inside a function body"),
])
def test_a_forbidden_import_is_found(tmp_path: Path, package: str, line: str, expected: str) -> None:
    for name in ALLOWED:
        (tmp_path / name).mkdir()
    (tmp_path / package / "probe.py").write_text(line + "\n")
    found = violations(tmp_path)
    assert len(found) == 1 and expected in found[0], found
