"""The package layering holds: common imports nothing of ours, server and client only common."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"common", "server", "client", "xeno"}
ALLOWED = {
    "common": {"common"},
    "server": {"common", "server"},
    "client": {"common", "client"},
    "xeno": OURS,
}


def imported_top_levels(path: Path) -> set[str]:
    """Every top-level package a module imports, at any depth (imports inside functions too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_its_layer_allows(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_top_levels(path) - ALLOWED[package])
        for path in (ROOT / package).rglob("*.py")
        if "pb" not in path.relative_to(ROOT).parts
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from server.app import ServerConfig\n")
    assert imported_top_levels(module) == {"server"}
