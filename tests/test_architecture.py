"""The package layering: imports run one way, core -> models -> guides -> inference -> diagnostics,
evaluation and data are leaves, only the CLI imports the experiments, and no module imports itself
back through others (lazy imports inside functions count)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"pyro_moe": "pyro_moe", "models": "pyro_moe.models", "guides": "pyro_moe.guides"}
FOLDERS["experiments"] = "pyro_moe.experiments"

BASE = {"errors", "validation", "distributed", "random_streams", "atomic_files", "run_lock"}
"""Top-level modules every package may import: errors, the validation helper, process groups, RNG state,
atomic file writes and the lock on a run folder."""

ALLOWED: dict[str, set[str]] = {
    "base": {"base"},
    "core": {"base", "core"},
    "models": {"base", "core", "models"},
    "guides": {"base", "core", "models", "guides"},
    # evaluation imports base and core only, so inference may use its metrics and temperature scaling (calibrate)
    "inference": {"base", "core", "models", "guides", "evaluation", "inference"},
    "diagnostics": {"base", "core", "models", "guides", "inference", "diagnostics"},
    "evaluation": {"base", "core", "evaluation"},
    "data": {"base", "data"},
    # bridges to other tools (lm-evaluation-harness): leaves over inference
    "integrations": {"base", "core", "models", "guides", "evaluation", "inference", "integrations"},
    "experiments": {
        "base",
        "core",
        "models",
        "guides",
        "inference",
        "diagnostics",
        "evaluation",
        "data",
        "experiments",
    },
}
"""Which packages each package may import (``cli``, ``__main__`` and the package root may import anything)."""


def module_files() -> dict[str, Path]:
    """Every module of the installed package by dotted name."""
    modules = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def layer_of(module: str) -> str:
    """``core``, ``models``, ..., ``base`` for the top-level helpers, ``top`` for the CLI and the root."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("cli", "__main__"):
        return "top"
    if parts[1] in BASE:
        return "base"
    return parts[1]


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The pyro_moe modules ``path`` imports, at module level or inside functions (``from pkg import
    name`` counts as importing ``pkg.name`` when that is a module, else ``pkg``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("pyro_moe")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pyro_moe"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return found


def test_every_folder_module_has_a_layer():
    modules = module_files()
    assert len(modules) > 60
    unknown = sorted(m for m in modules if layer_of(m) not in (*ALLOWED, "top"))
    assert not unknown, f"modules outside the known packages: {unknown}"


def test_imports_run_one_way():
    modules = module_files()
    upward = []
    for module, path in modules.items():
        layer = layer_of(module)
        if layer == "top":
            continue
        for imported in imports_of(path, modules):
            target = layer_of(imported)
            if target not in ALLOWED[layer]:
                upward.append(f"{module} ({layer}) imports {imported} ({target})")
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_only_the_cli_imports_the_experiments():
    modules = module_files()
    offenders = [
        module
        for module, path in modules.items()
        if layer_of(module) not in ("experiments",)
        and module.split(".")[:2] != ["pyro_moe", "cli"]
        and any(layer_of(m) == "experiments" for m in imports_of(path, modules))
    ]
    assert not offenders, f"{offenders} import pyro_moe.experiments; only the pyro_moe.cli package may"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a list of modules, the first repeated at the end), or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == 1:
                return [*stack[stack.index(child) :], child]
            if child not in state and (cycle := visit(child)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_circular_imports():
    modules = module_files()
    # a package's own __init__ re-exporting its modules is not a cycle; the package root is the API
    graph = {
        module: {m for m in imports_of(path, modules) if m in modules and not module.startswith(m + ".")}
        for module, path in modules.items()
        if module != "pyro_moe"
    }
    assert find_cycle(graph) is None, f"circular import: {' -> '.join(find_cycle(graph))}"


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [({"a": {"b"}, "b": {"c"}, "c": set()}, None), ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"])],
)
def test_the_cycle_finder_finds_cycles(graph, cycle):
    assert find_cycle(graph) == cycle


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """A core module importing inference is caught (the check is not vacuous)."""
    path = tmp_path / "upward.py"
    path.write_text("def f():\n    from pyro_moe.inference.fitting import fit\n")
    modules = module_files()
    imported = imports_of(path, modules)
    assert imported == {"pyro_moe.inference.fitting"}
    assert layer_of("pyro_moe.inference.fitting") not in ALLOWED["core"]
