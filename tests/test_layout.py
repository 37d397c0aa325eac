"""The package layout: one import name, imports that point down only, and no import circles.

The checkout's folders are mounted into the ``polyak`` namespace (pyproject's package-dir); this file reads
every module's imports from its syntax tree, so a forbidden import inside a function is seen too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from polyak.shipping import MOUNTED

ROOT = Path(__file__).resolve().parents[1]
# folder in the checkout -> the package it is in the namespace
MOUNTS = {"polyak": "polyak", **{folder: f"polyak.{folder}" for folder in MOUNTED}}

# Each layer and the packages it must never import: cli -> client (SDK) -> contract on one side,
# service.server -> service.engine -> workers -> contract on the other.
LAYERS = {
    "polyak.service.server": ("polyak.cli", "polyak.client"),
    "polyak.service.engine": ("polyak.cli", "polyak.client", "polyak.service.server"),
    "polyak.workers": ("polyak.cli", "polyak.client", "polyak.service"),
    "polyak.client": ("polyak.cli", "polyak.service", "polyak.workers"),
    "polyak.contract": ("polyak.cli", "polyak.client", "polyak.service", "polyak.workers", "polyak.shipping"),
}


def module_files() -> dict[str, Path]:
    """Every module of the package by its dotted name (packages by their ``__init__``)."""
    modules = {}
    for folder, package in MOUNTS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


MODULES = module_files()


def imported_modules(path: Path, top_level_only: bool = False) -> set[str]:
    """Every module an import statement in ``path`` names (inside functions too, unless top_level_only);
    ``from package import module`` names the module."""
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES)
    return names


def _is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def import_graph() -> dict[str, set[str]]:
    """Module -> the polyak modules it imports (a package's ``__init__`` that only gathers names is no edge)."""
    return {name: {m for m in imported_modules(path) if m in MODULES and m != name}
            for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_imports_point_down_only(layer):
    offences = [
        f"{path.relative_to(ROOT)} imports {module}"
        for name, path in MODULES.items() if _is_under(name, layer)
        for module in imported_modules(path)
        if any(_is_under(module, banned) for banned in LAYERS[layer])
    ]
    assert not offences, "\n".join(offences)


def test_no_import_circles():
    # Package __init__ modules that gather their children's names are left out: importing a child never
    # needs its parent's names.
    graph = {m: deps for m, deps in import_graph().items() if MODULES[m].name != "__init__.py"}
    assert cycles(graph) == []


def test_the_cycle_finder_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_checker_sees_a_forbidden_import(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from polyak.service.server.store import Store\n")
    assert any(_is_under(m, "polyak.service.server") for m in imported_modules(bad))


def test_every_module_imports_through_the_polyak_namespace():
    """No module or test imports the checkout's folders by their own names (`import client` would collide)."""
    bare = MOUNTED
    files = [*MODULES.values(), *sorted((ROOT / "tests").glob("*.py")), *sorted((ROOT / "bench").glob("*.py"))]
    offences = [f"{path.relative_to(ROOT)} imports {m}" for path in files for m in imported_modules(path)
                if m.split(".")[0] in bare]
    assert not offences, "\n".join(offences)


def test_the_contract_imports_pydantic_numpy_and_the_standard_library_only():
    allowed = {"pydantic", "numpy", "polyak"}
    offences = [
        f"{path.relative_to(ROOT)} imports {module}"
        for name, path in MODULES.items() if _is_under(name, "polyak.contract")
        for module in imported_modules(path, top_level_only=True)
        if module.split(".")[0] not in allowed | sys.stdlib_module_names
    ]
    assert not offences, "\n".join(offences)


@pytest.mark.parametrize("modules", [
    "polyak",
    "polyak.contract.spec, polyak.contract.wire, polyak.contract.errors",
    "polyak.workers.gradient_worker, polyak.service.engine.parameter_server",
])
def test_the_package_root_the_contract_and_the_actors_load_no_http_client(modules):
    code = (f"import sys, {modules}; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('httpx', 'fastapi', 'uvicorn', 'matplotlib') "
            "or m.startswith(('polyak.client', 'polyak.cli', 'polyak.service.server'))); print(bad)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_client_imports_ray_only_inside_the_ray_submit_command():
    """`pip install polyak` users who submit jobs or use a model never import Ray."""
    offences = [
        str(path.relative_to(ROOT))
        for name, path in MODULES.items() if _is_under(name, "polyak.client") or _is_under(name, "polyak.cli")
        if any(_is_under(m, "ray") for m in imported_modules(path, top_level_only=True))
    ]
    assert not offences


def test_one_cli_package_and_the_server_holds_no_commands():
    cli = {p.stem for p in (ROOT / "polyak" / "cli").glob("*.py")}
    assert {"__init__", "app", "jobs", "train", "tuning", "models", "cluster"} <= cli
    click_users = sorted(str(p.relative_to(ROOT)) for name, p in MODULES.items()
                         if "click" in imported_modules(p) and not _is_under(name, "polyak.cli"))
    assert click_users == []
    assert sorted(p.name for p in (ROOT / "service").glob("*.py")) == ["__init__.py"]


def test_no_function_is_longer_than_one_screen():
    """About 60 lines at most: a function longer than that does several things and gets split by them."""
    long = sorted(
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in MODULES.values()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60
    )
    assert long == []


def test_engine_and_server_hold_the_modules_design_names():
    engine = {p.stem for p in (ROOT / "service/engine").glob("*.py")}
    server = {p.stem for p in (ROOT / "service/server").glob("*.py")}
    assert {"trainer", "local_engine", "ray_engine", "parameter_server", "ps_core", "optim", "schedules",
            "criteria", "checkpoint"} <= engine
    assert {"api", "store", "scheduler", "events", "job", "cluster", "paths"} <= server
