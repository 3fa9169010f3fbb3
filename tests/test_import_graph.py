"""No import cycle between afd's packages (issue 19 item 7).

A package here is one of the card's folders or top-level modules (afd.comm, afd.config,
afd.engine, ...) or a sub-package of a folder (afd.scheduler.core, afd.scheduler.planner);
a folder's loose modules belong to the folder (afd.kernels.ops is in afd.kernels), and
afd/__init__.py is the package "afd". Every import counts: module level, function level, under
TYPE_CHECKING, and importlib.import_module of a literal name, since a deferred import only hides
a cycle from the interpreter, not from the reader.
"""

from __future__ import annotations

import ast
import os
import tomllib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Package edges (importer, imported) left out of the cycle search, each naming the one cycle it
# tolerates. An entry whose edge no longer exists fails the test, so it goes with the code.
ALLOWED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    importer: str  # module name
    imported: str  # module (or package) name inside afd
    where: str  # path:line


def package_roots() -> dict[str, Path]:
    """afd package name -> its folder, from pyproject's package-dir (folders sit apart on disk)."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: ROOT / folder for name, folder in setup["package-dir"].items()}


def discover() -> tuple[dict[str, Path], set[str]]:
    """Every module under afd (name -> file) and the names that are packages."""
    modules: dict[str, Path] = {}
    for name, folder in package_roots().items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if not (path.parent / "__init__.py").exists():
                continue  # a script or data folder, not importable as part of the package
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join([name, *parts])] = path
    packages = {m for m, p in modules.items() if p.name == "__init__.py"}
    return modules, packages


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest afd module that `name` names (a.b.C -> a.b), None outside afd."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    keep = len(parts) - node.level + (1 if is_package else 0)
    return ".".join(parts[:keep] + ([node.module] if node.module else []))


def _literal_import(node: ast.Call) -> str | None:
    """The name given to importlib.import_module, or its constant prefix for an f-string."""
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if called != "import_module" or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value).rstrip(".")
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path], packages: set[str]):
    """Every afd module that `module` imports, wherever the import statement sits."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, module in packages, node)
            # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod
            names = [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and (literal := _literal_import(node)):
            names = [literal]
        for name in names:
            target = _resolve(name, modules)
            if target and target != module:
                yield Import(module, target, f"{os.path.relpath(path, ROOT)}:{node.lineno}")


def package_of(module: str, packages: set[str]) -> str:
    """afd.<folder>, or afd.<folder>.<sub-package> for a module inside a folder's sub-package."""
    parts = module.split(".")
    if len(parts) >= 3 and ".".join(parts[:3]) in packages:
        return ".".join(parts[:3])
    return ".".join(parts[:2])


def package_cycles(edges: list[Import], packages: set[str]) -> list[list[str]]:
    """The strongly connected sets of two or more packages in the package import graph."""
    graph: dict[str, set[str]] = defaultdict(set)
    for e in edges:
        a, b = package_of(e.importer, packages), package_of(e.imported, packages)
        if a != b:
            graph[a].add(b)
            graph.setdefault(b, set())  # every package is a node, importer or not

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    reachable = {p: reach(p) for p in graph}
    cycles = {frozenset({p} | {q for q in reachable[p] if p in reachable[q]}) for p in graph}
    return sorted(sorted(c) for c in cycles if len(c) > 1)


def describe(cycle: list[str], edges: list[Import], packages: set[str]) -> str:
    """One line per package edge inside the cycle, with the first import that makes it."""
    inside, lines = set(cycle), {}
    for e in edges:
        a, b = package_of(e.importer, packages), package_of(e.imported, packages)
        if a != b and a in inside and b in inside:
            lines.setdefault((a, b), f"  {a} -> {b}: {e.importer} imports {e.imported} ({e.where})")
    return "{" + ", ".join(cycle) + "}\n" + "\n".join(lines[k] for k in sorted(lines))


def all_imports() -> tuple[list[Import], set[str]]:
    modules, packages = discover()
    edges = [e for m, p in modules.items() for e in imports_of(m, p, modules, packages)]
    return edges, packages


def test_import_graph_sees_every_folder():
    modules, packages = discover()
    for name in package_roots():
        assert name in packages, name
    assert {"afd.engine.llm_engine", "afd.scheduler.core.scheduler", "afd.kernels.ops"} <= set(
        modules
    )


def test_a_cycle_behind_deferred_imports_is_found(tmp_path):
    """Function-level, relative and importlib imports are edges like top-level ones."""
    files = {
        "afd.a": "import afd.b.y\n",
        "afd.b": "",
        "afd.b.x": "def f():\n    from . import y\n",
        "afd.b.y": "import importlib as il\ndef g(m):\n    return il.import_module(f'afd.c.{m}')\n",
        "afd.c": "",
        "afd.c.z": "def h():\n    from afd.a import something\n",
    }
    modules = {}
    for name, text in files.items():
        path = tmp_path / f"{name}.py"
        path.write_text(text)
        modules[name] = path
    packages = {"afd.b", "afd.c"}
    edges = [e for m, p in modules.items() for e in imports_of(m, p, modules, packages)]
    assert {(e.importer, e.imported) for e in edges} == {
        ("afd.a", "afd.b.y"),
        ("afd.b.x", "afd.b.y"),
        ("afd.b.y", "afd.c"),
        ("afd.c.z", "afd.a"),
    }
    assert package_cycles(edges, packages) == [["afd.a", "afd.b", "afd.c"]]


def test_packages_are_listed_for_install():
    """Every sub-package ships in a wheel: pyproject lists each folder with an __init__.py."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    _, packages = discover()
    assert sorted(packages - {"afd"} - set(setup["packages"])) == []


def test_no_package_import_cycle():
    edges, packages = all_imports()
    pairs = [(package_of(e.importer, packages), package_of(e.imported, packages)) for e in edges]
    stale = [pair for pair in ALLOWED if pair not in pairs]
    assert not stale, f"allow-listed package edges gone, delete their ALLOWED entries: {stale}"
    kept = [e for e, pair in zip(edges, pairs, strict=True) if pair not in ALLOWED]
    cycles = package_cycles(kept, packages)
    assert not cycles, "package import cycles:\n" + "\n".join(
        describe(c, kept, packages) for c in cycles
    )
