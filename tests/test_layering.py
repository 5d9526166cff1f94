"""The import layering of the project, checked on the source with `ast` (nothing is imported):

    core -> fusion -> plugins_trt
    core -> pipeline.data -> pipeline.models -> pipeline.cache -> pipeline.training -> pipeline.ablation -> pipeline.cli
    pipeline.harness sits beside pipeline.ablation (above pipeline.training, below pipeline.cli)
    export sits above pipeline.models (core, fusion, plugins_trt, pipeline.data, pipeline.models)

(a) no package imports one it may not (top-level and function-level imports, absolute and relative),
(b) no project import inside a function, except in pipeline/cli.py (its commands import lazily so that
    `layerfuse --help` stays fast),
(c) no cycle between modules in the module-level import graph (imports under `if TYPE_CHECKING:` do not run,
    so they count for (a) only).
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "layerfuse"
PACKAGES = ("core", "fusion", "plugins_trt", "export", "pipeline")  # folders installed as layerfuse.<name>

_PIPELINE_BELOW_CLI = ("pipeline.data", "pipeline.models", "pipeline.cache", "pipeline.training", "pipeline.ablation", "pipeline.harness")
# layer -> the other layers it may import (its own is always allowed)
ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "fusion": frozenset({"core"}),
    "plugins_trt": frozenset({"core", "fusion"}),
    "pipeline": frozenset(),  # pipeline/__init__.py: the package docstring only
    "pipeline.data": frozenset({"core"}),
    "pipeline.models": frozenset({"core", "fusion", "pipeline.data"}),
    "pipeline.cache": frozenset({"core", "fusion", "pipeline.data", "pipeline.models"}),
    "pipeline.training": frozenset({"core", "fusion", "pipeline.data", "pipeline.models", "pipeline.cache"}),
    "pipeline.ablation": frozenset({"core", "fusion", "pipeline.data", "pipeline.models", "pipeline.cache", "pipeline.training"}),
    "pipeline.harness": frozenset({"core", "fusion", "pipeline.data", "pipeline.models", "pipeline.cache", "pipeline.training"}),
    "pipeline.cli": frozenset({"core", "fusion", "plugins_trt", "export", "pipeline", *_PIPELINE_BELOW_CLI}),
    "export": frozenset({"core", "fusion", "plugins_trt", "pipeline.data", "pipeline.models"}),
}
LAZY_IMPORTS_ALLOWED = frozenset({"pipeline.cli"})  # layers whose functions may import project modules


@dataclass(frozen=True)
class ImportSite:
    """One project import: `source` module imports `target` module at path:line."""

    source: str
    target: str
    path: Path
    line: int
    in_function: bool
    type_checking: bool  # under `if TYPE_CHECKING:` (never runs)

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root)}:{self.line}"


@dataclass
class ImportProblems:
    upward: list[str] = field(default_factory=list)  # (a)
    in_function: list[str] = field(default_factory=list)  # (b)
    cycles: list[str] = field(default_factory=list)  # (c)


def layer_of(module: str) -> str | None:
    """`layerfuse.pipeline.cache.reader` -> "pipeline.cache"; None for a module outside the project."""
    if module != PROJECT and not module.startswith(PROJECT + "."):
        return None
    name = module[len(PROJECT) + 1:]
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if name == layer or name.startswith(layer + "."):
            return layer
    return None


def project_modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every .py inside a package (a folder with __init__.py) of PACKAGES."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            folders = path.relative_to(root).parent.parts
            if not all((root.joinpath(*folders[:i + 1]) / "__init__.py").is_file() for i in range(len(folders))):
                continue  # a script or build output in a plain folder, not an importable module
            parts = [*folders] + ([] if path.name == "__init__.py" else [path.stem])
            modules[".".join([PROJECT, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(module: str, is_package: bool, node: ast.ImportFrom | ast.Import, modules: dict[str, Path]) -> list[str]:
    """The project modules an import statement names (a `from X import name` is X.name when that is a module)."""
    if isinstance(node, ast.Import):
        return list(dict.fromkeys(a.name for a in node.names))
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return list(dict.fromkeys(f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names))


def import_sites(root: Path) -> tuple[dict[str, Path], list[ImportSite]]:
    """Every project import in the tree, with where it is and whether it runs at import time."""
    modules = project_modules(root)
    sites: list[ImportSite] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))

        def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in _resolve(module, path.name == "__init__.py", child, modules):
                        if target == PROJECT or target.startswith(PROJECT + "."):
                            sites.append(ImportSite(module, target, path, child.lineno, in_function, type_checking))
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)),
                      type_checking or (isinstance(child, ast.If) and _is_type_checking(child.test)))

        visit(tree, False, False)
    return modules, sites


def _cycles(graph: dict[str, dict[str, ImportSite]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected component of more than one module, or a self-import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan; the graph is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, {}):
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    out = []
    for comp in components:
        start, members = comp[0], set(comp)
        paths = {start: [start]}  # breadth-first from start back to start, inside the component
        queue = [start]
        cycle = None
        while queue and cycle is None:
            v = queue.pop(0)
            for w in sorted(graph.get(v, {})):
                if w == start:
                    cycle = paths[v] + [start]
                    break
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
        out.append(cycle)
    return out


def import_problems(root: Path) -> ImportProblems:
    """(a) imports a layer may not make, (b) project imports inside functions, (c) module-level import cycles."""
    _, sites = import_sites(root)
    problems = ImportProblems()
    graph: dict[str, dict[str, ImportSite]] = {}
    for s in sites:
        src, dst = layer_of(s.source), layer_of(s.target)
        if dst is None:
            problems.upward.append(f"{s.where(root)}: {s.source} imports {s.target}, which is in no layer of the project")
        elif dst != src and dst not in ALLOWED[src]:
            problems.upward.append(f"{s.where(root)}: {s.source} ({src}) imports {s.target} ({dst}); "
                                   f"{src} may import only {', '.join(sorted(ALLOWED[src])) or 'nothing from the project'}")
        if s.in_function and src not in LAZY_IMPORTS_ALLOWED:
            problems.in_function.append(f"{s.where(root)}: {s.source} imports {s.target} inside a function; import it at the top")
        if not s.in_function and not s.type_checking:
            graph.setdefault(s.source, {}).setdefault(s.target, s)
    for cycle in _cycles(graph):
        edges = ", ".join(f"{a} -> {b} at {graph[a][b].where(root)}" for a, b in zip(cycle, cycle[1:]))
        problems.cycles.append(f"import cycle {' -> '.join(cycle)} ({edges})")
    return problems


# --------------------------------------------------------------------------------------------------- the project


def test_no_import_of_a_layer_above() -> None:
    problems = import_problems(ROOT).upward
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_no_project_import_inside_a_function() -> None:
    problems = import_problems(ROOT).in_function
    assert not problems, "lazy project imports (allowed only in pipeline/cli.py):\n" + "\n".join(problems)


def test_no_import_cycle() -> None:
    problems = import_problems(ROOT).cycles
    assert not problems, "\n".join(problems)


def test_every_package_is_seen() -> None:
    modules = project_modules(ROOT)
    assert {layer_of(m) for m in modules} == set(ALLOWED), "a layer has no module: the checker would pass vacuously"
    assert "layerfuse.pipeline.cli" in modules and "layerfuse.fusion.msda" in modules


# ------------------------------------------------------------------------------------------ the checker itself


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def _fake_tree(root: Path, extra: dict[str, str]) -> None:
    inits = ["core", "fusion", "plugins_trt", "export", "pipeline", *(p.replace(".", "/") for p in _PIPELINE_BELOW_CLI)]
    _write(root, {f"{p}/__init__.py": "" for p in inits})
    _write(root, {"core/clock.py": "X = 1\n", "fusion/base.py": "from layerfuse.core.clock import X\n",
                  "pipeline/cli.py": "def cmd():\n    from layerfuse.pipeline.ablation import run\n", **extra})


def test_checker_is_clean_on_a_correct_tree(tmp_path: Path) -> None:
    _fake_tree(tmp_path, {"pipeline/ablation/run.py": "from layerfuse.fusion.base import X\nfrom ...core import clock\n"})
    problems = import_problems(tmp_path)
    assert problems == ImportProblems()


def test_checker_catches_an_upward_import(tmp_path: Path) -> None:
    _fake_tree(tmp_path, {"pipeline/data/records.py": "import os\n\nfrom layerfuse.pipeline.models import encoder\n",
                          "pipeline/models/encoder.py": "", "core/hub.py": "from ..fusion import base\n",
                          "export/onnx.py": "from layerfuse.pipeline.cache.reader import R\n", "pipeline/cache/reader.py": "R = 1\n"})
    problems = import_problems(tmp_path).upward
    assert len(problems) == 3, problems
    assert any(p.startswith("pipeline/data/records.py:3: ") and "(pipeline.models)" in p for p in problems)
    assert any(p.startswith("core/hub.py:1: ") and "layerfuse.fusion.base" in p for p in problems)
    assert any(p.startswith("export/onnx.py:1: ") and "layerfuse.pipeline.cache.reader" in p for p in problems)


def test_checker_catches_a_function_level_import(tmp_path: Path) -> None:
    _fake_tree(tmp_path, {"fusion/layers.py": "import math\n\n\ndef parse():\n    from .base import X\n    return X\n",
                          "fusion/vlm.py": "class V:\n    def f(self):\n        import layerfuse.core.clock\n"})
    problems = import_problems(tmp_path).in_function
    assert [p.split(": ")[0] for p in problems] == ["fusion/layers.py:5", "fusion/vlm.py:3"], problems


def test_checker_catches_a_cycle(tmp_path: Path) -> None:
    _fake_tree(tmp_path, {"export/onnx.py": "from .verify import check\n\n\ndef export():\n    pass\n",
                          "export/verify.py": "from typing import TYPE_CHECKING\n\nfrom .frontend import F\n",
                          "export/frontend.py": "from layerfuse.export import onnx\nF = 1\n",
                          "export/engine.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .engine_ui import U\n",
                          "export/engine_ui.py": "from .engine import E\n"})
    problems = import_problems(tmp_path)
    assert problems.upward == [] and problems.in_function == []
    assert len(problems.cycles) == 1, problems.cycles  # engine <-> engine_ui is TYPE_CHECKING only: no cycle
    cycle = problems.cycles[0]
    assert "layerfuse.export.frontend -> layerfuse.export.onnx -> layerfuse.export.verify -> layerfuse.export.frontend" in cycle
    assert "export/frontend.py:1" in cycle and "export/onnx.py:1" in cycle and "export/verify.py:3" in cycle
