"""The domain is pure (shared/DESIGN.md §2): no I/O imports, no floats, no clock reads."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

DOMAIN = Path(__file__).resolve().parents[2] / "edge_agent" / "domain"
FORBIDDEN_MODULES = {
    "asyncio",
    "aiosqlite",
    "sqlite3",
    "asyncua",
    "pymodbus",
    "paho",
    "socket",
    "structlog",
    "logging",
    "os",
    "io",
    "time",
    "threading",
    "subprocess",
    "pathlib",
    "edge_agent.sources",
    "edge_agent.uplink",
    "edge_agent.store",
    "edge_agent.engine",
    "edge_agent.cli",
}
FILES = sorted(DOMAIN.glob("*.py"))


def test_the_domain_has_modules() -> None:
    assert len(FILES) >= 6


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_domain_module_imports_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            root = {name, name.split(".")[0], ".".join(name.split(".")[:2])}
            assert not root & FORBIDDEN_MODULES, f"{path.name}:{node.lineno} imports {name}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_domain_module_holds_no_float_and_reads_no_clock(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            assert node.id != "float", f"{path.name}:{node.lineno} uses float"
        if isinstance(node, ast.Constant):
            assert not isinstance(node.value, float), f"{path.name}:{node.lineno} float literal"
        if isinstance(node, ast.Attribute):
            assert node.attr not in {"now", "utcnow", "today", "time"}, (
                f"{path.name}:{node.lineno} reads the clock ({node.attr}); pass time in"
            )
