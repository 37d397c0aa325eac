"""The package layout of DESIGN.md: imports point down only (cli -> server -> engine -> workers -> client)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each folder and the packages it must never import (anything above it).
LAYERS = {
    "service/server": ("polyak.service.cli",),
    "service/engine": ("polyak.service.cli", "polyak.service.server"),
    "workers": ("polyak.service",),
    "client": ("polyak.service", "polyak.workers"),
}


def imported_modules(path: Path, top_level_only: bool = False) -> set[str]:
    """Every module an import statement in ``path`` names (inside functions too, unless top_level_only)."""
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_imports_point_down_only(folder):
    offences = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for module in imported_modules(path)
        if any(_is_under(module, banned) for banned in LAYERS[folder])
    ]
    assert not offences, "\n".join(offences)


def test_client_imports_ray_only_inside_the_ray_submit_command():
    """`pip install polyak` users who submit jobs or use a model never import Ray."""
    offences = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "client").glob("*.py"))
        if any(_is_under(m, "ray") for m in imported_modules(path, top_level_only=True))
    ]
    assert not offences


def test_the_checker_sees_a_forbidden_import(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from polyak.service.server.store import Store\n")
    assert any(_is_under(m, "polyak.service.server") for m in imported_modules(bad))


def test_engine_and_server_hold_the_modules_design_names():
    engine = {p.stem for p in (ROOT / "service/engine").glob("*.py")}
    server = {p.stem for p in (ROOT / "service/server").glob("*.py")}
    assert {"trainer", "local_engine", "ray_engine", "parameter_server", "ps_core", "optim", "schedules",
            "criteria", "checkpoint"} <= engine
    assert {"api", "store", "scheduler", "events", "job", "cluster", "paths"} <= server
    assert sorted(p.name for p in (ROOT / "service").glob("*.py")) == ["__init__.py", "cli.py"]
