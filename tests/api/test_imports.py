"""The package's import graph has no cycle and runs one way down its wings, counting every import: at module level,
inside functions, and under ``TYPE_CHECKING`` (a late import inside a function hides a cycle from Python, not from a
reader), the package root included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "minipissa"


def import_graph(package: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports anywhere in its file}, the package root (its ``__init__``) among
    them: nothing inside may import it (``from . import x`` inside the package means module x, not the root)."""

    def name_of(path: Path) -> str:
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name_of(p): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # `from . import x` and `from .pkg import mod` name modules; `from .mod import f` a function.
                found.update(f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


#: The wings, from the numerics up: a module may import its own wing and those below, never one above. The verbs
#: (minipissa/model.py, report.py) sit above every wing, and the package root above them.
WINGS = ("core", "nn", "plan", "io", "interop")


def floor(module: str) -> int:
    """0 for core ... 4 for interop; 5 for the verbs beside the root; 6 for the root itself."""
    parts = module.split(".")
    if len(parts) == 1:
        return len(WINGS) + 1
    return WINGS.index(parts[1]) if parts[1] in WINGS else len(WINGS)


def imports_up(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if floor(b) > floor(a))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_imports_run_down_the_wings() -> None:
    wings = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert wings == set(WINGS), "every subpackage of minipissa is a wing, and every wing a folder"
    assert imports_up(import_graph(PACKAGE)) == []


def test_an_import_up_the_wings_or_of_the_root_is_found(tmp_path: Path) -> None:
    """The check can fail: a core module importing a layer, and a file module importing the package root."""
    package = tmp_path / "minipissa"
    for wing in ("core", "nn", "io"):
        (package / wing).mkdir(parents=True)
        (package / wing / "__init__.py").write_text("")
    (package / "__init__.py").write_text("from .io.f import g\n__version__ = '0'\n")
    (package / "nn" / "layer.py").write_text("from ..core import maths\n")
    (package / "core" / "maths.py").write_text("def h():\n    from ..nn.layer import x\n")
    (package / "io" / "f.py").write_text("from .. import __version__\nfrom ..nn import layer\n")
    assert imports_up(import_graph(package)) == ["minipissa.core.maths -> minipissa.nn.layer",
                                                 "minipissa.io.f -> minipissa"]  # fmt: skip


def test_late_and_type_checking_imports_count(tmp_path: Path) -> None:
    """The check can fail: a cycle closed by an import inside a function, or under TYPE_CHECKING, is found."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import f\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\ndef f():\n    pass\n")
    (package / "sub" / "b.py").write_text("def g():\n    from ..c import h\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n")
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (package / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(package)) is None
