"""The package keeps its layers: no upward imports, no import cycles, Slicer/Qt/VTK and trame only where allowed.

The static part parses every ``.py`` file of ``UNet3DSegmentLib`` and the Slicer module file
``UNet3DSegment.py`` with ``ast`` and collects every import, at module level and inside functions,
methods and classes, absolute (``UNet3DSegmentLib.engine.card``) and relative (``from ..engine.card
import x``, ``from . import x``, resolved against the importing file's package). The checker takes the
package folder as a parameter, and a test runs it on a small synthetic package to show that it fails.

The runtime part imports modules in a fresh interpreter and looks at ``sys.modules``: the layers below
the user interfaces load no Slicer, Qt, VTK, trame or deep-learning framework at import.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
LIB_DIR = REPO / "UNet3DSegment" / "UNet3DSegmentLib"
MODULE_FILE = REPO / "UNet3DSegment" / "UNet3DSegment.py"

# --------------------------------------------------------------------------------------------------
# The rules

# Which layers each layer may import, besides itself. "root" is UNet3DSegmentLib/__init__.py (only
# __version__), "main" is UNet3DSegmentLib/__main__.py, "module" is the Slicer module file
# UNet3DSegment.py. The package root may be imported by every layer (``from .. import __version__``):
# it imports nothing of the package itself (its own row is empty), so it cannot carry a dependency up.
LAYERS: dict[str, frozenset[str]] = {
    "base": frozenset(),
    "runtime": frozenset({"base"}),
    "engine": frozenset({"base", "runtime"}),
    "training": frozenset({"base", "runtime", "engine"}),
    "client": frozenset({"base", "runtime", "engine"}),
    "mrml": frozenset({"base", "runtime", "engine", "client"}),
    "web": frozenset({"base", "runtime", "engine", "client", "mrml", "training"}),  # training: demo MRI
    "cli": frozenset({"base", "runtime", "engine", "training", "client", "mrml", "web"}),
    "root": frozenset(),
    "main": frozenset({"cli"}),
    "module": frozenset({"base", "engine", "client", "mrml"}),
}
IMPORTABLE_BY_ALL = frozenset({"root"})
FOLDER_LAYERS = frozenset(LAYERS) - {"root", "main", "module"}
LAYER_TITLES = {"root": "the package root (__init__.py)", "main": "__main__.py", "module": "UNet3DSegment.py"}

SLICER_NAMES = frozenset({"slicer", "qt", "ctk", "vtk", "vtkmodules", "PythonQt"})
SLICER_LAYERS = frozenset({"mrml", "web", "module"})  # the only places that may import those
TRAME_FREE_LAYERS = frozenset({"base", "runtime", "engine"})  # may not import trame (trame*, any level)


# --------------------------------------------------------------------------------------------------
# The checker


@dataclass(frozen=True)
class Import:
    """One imported module, as written in one file."""

    file: str  # path shown in messages: relative to the package folder, e.g. "engine/pipeline.py"
    line: int
    importer: str  # dotted name of the importing module
    target: str  # dotted name of the imported module (for ``from m import name``: m.name if a module)
    in_function: bool
    type_only: bool  # under ``if TYPE_CHECKING:``: a dependency, but never executed


@dataclass(frozen=True)
class Problem:
    kind: str  # "layer", "cycle" or "framework"
    message: str


@dataclass(frozen=True)
class _Source:
    path: Path
    shown: str
    module: str
    is_package: bool


def _sources(package_dir: Path, module_files: Sequence[Path]) -> list[_Source]:
    package_dir = Path(package_dir)
    sources = []
    for path in sorted(package_dir.rglob("*.py")):
        relative = path.relative_to(package_dir)
        parts = (package_dir.name,) + relative.with_suffix("").parts
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        sources.append(_Source(path, relative.as_posix(), module, is_package))
    for path in module_files:
        path = Path(path)
        sources.append(_Source(path, path.name, path.stem, False))
    return sources


class _ImportCollector(ast.NodeVisitor):
    """Every ``import``/``from ... import`` (and ``importlib.import_module("literal")``) of one file."""

    def __init__(self, source: _Source, known: frozenset[str]) -> None:
        self.source = source
        self.known = known
        self.imports: list[Import] = []
        self.problems: list[Problem] = []
        self._function_depth = 0
        self._type_only_depth = 0

    # scopes ---------------------------------------------------------------------------------------
    def _in_function(self, node: ast.AST) -> None:
        self._function_depth += 1
        self.generic_visit(node)
        self._function_depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _in_function

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        type_checking = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        )
        self.visit(test)
        self._type_only_depth += type_checking
        for child in node.body:
            self.visit(child)
        self._type_only_depth -= type_checking
        for child in node.orelse:
            self.visit(child)

    # imports --------------------------------------------------------------------------------------
    def _add(self, node: ast.AST, target: str) -> None:
        self.imports.append(Import(
            self.source.shown, node.lineno, self.source.module, target,
            self._function_depth > 0, self._type_only_depth > 0,
        ))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._resolve(node.level, node.module or "")
        if base is None:
            self.problems.append(Problem("layer", (
                f"{self.source.shown}:{node.lineno} has a relative import (level {node.level}) "
                f"beyond the top-level package"
            )))
            return
        targets = []
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            target = submodule if alias.name != "*" and submodule in self.known else base
            if target not in targets:
                targets.append(target)
        for target in targets:
            self._add(node, target)

    def visit_Call(self, node: ast.Call) -> None:
        function = node.func
        name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
        if name in ("import_module", "__import__") and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str) and not first.value.startswith("."):
                self._add(node, first.value)
        self.generic_visit(node)

    def _resolve(self, level: int, module: str) -> Optional[str]:
        if level == 0:
            return module
        package = self.source.module if self.source.is_package else self.source.module.rpartition(".")[0]
        parts = package.split(".") if package else []
        if level - 1 >= len(parts):
            return None
        parts = parts[: len(parts) - (level - 1)]
        return ".".join(parts + ([module] if module else []))


def collect_imports(package_dir: Path, module_files: Sequence[Path] = ()) -> tuple[list[Import], list[Problem]]:
    """Every import of the package under ``package_dir`` and of ``module_files``, with parse problems."""
    sources = _sources(package_dir, module_files)
    known = frozenset(source.module for source in sources)
    imports: list[Import] = []
    problems: list[Problem] = []
    for source in sources:
        tree = ast.parse(source.path.read_text(encoding="utf-8"), filename=str(source.path))
        collector = _ImportCollector(source, known)
        collector.visit(tree)
        imports += collector.imports
        problems += collector.problems
    return imports, problems


def layer_of(module: str, package: str, module_names: Iterable[str] = ()) -> Optional[str]:
    """Layer of a module of the package ("root", "main", a folder name) or of the Slicer module file;
    None for modules from elsewhere (numpy, slicer, ...)."""
    if module in module_names:
        return "module"
    if module == package:
        return "root"
    if not module.startswith(package + "."):
        return None
    first = module[len(package) + 1:].split(".")[0]
    return "main" if first == "__main__" else first


def _title(layer: str) -> str:
    return LAYER_TITLES.get(layer, layer)


def _allowed_text(layer: str) -> str:
    allowed = sorted(LAYERS.get(layer, frozenset()))
    return ", ".join(allowed) if allowed else "nothing of the package"


def layer_problems(imports: Sequence[Import], package: str, module_names: Iterable[str] = ()) -> list[Problem]:
    """(a) upward imports and modules outside the table, and (c) Slicer/Qt/VTK and trame imports."""
    module_names = frozenset(module_names)
    problems = []
    for item in imports:
        layer = layer_of(item.importer, package, module_names)
        where = f"{item.file}:{item.line} imports {item.target}"
        if layer not in LAYERS:
            continue  # reported once per module by unplaced_problems
        top = item.target.split(".")[0]
        if top in SLICER_NAMES and layer not in SLICER_LAYERS:
            problems.append(Problem("framework", (
                f"{where}: {_title(layer)} may not import {top} (only mrml/, web/ and UNet3DSegment.py "
                f"may import slicer, qt, ctk or vtk)"
            )))
        if top.startswith("trame") and layer in TRAME_FREE_LAYERS:
            problems.append(Problem("framework", (
                f"{where}: {layer} may not import trame ({', '.join(sorted(TRAME_FREE_LAYERS))} stay free of the web UI)"
            )))
        target_layer = layer_of(item.target, package, module_names)
        if target_layer is None or target_layer == layer or target_layer in IMPORTABLE_BY_ALL:
            continue
        if target_layer not in LAYERS:
            problems.append(Problem("layer", f"{where}: {target_layer} is in no layer of the table"))
        elif target_layer not in LAYERS[layer]:
            problems.append(Problem("layer", (
                f"{where}: {_title(layer)} may not import {_title(target_layer)} "
                f"({_title(layer)} may import {_allowed_text(layer)})"
            )))
    return problems


def unplaced_problems(package_dir: Path, module_files: Sequence[Path] = ()) -> list[Problem]:
    """Modules of the package that belong to no layer of the table (a new folder, a loose module)."""
    module_names = frozenset(Path(path).stem for path in module_files)
    return [
        Problem("layer", (
            f"{source.shown}: module {source.module} is in no layer of the table "
            f"({', '.join(sorted(FOLDER_LAYERS))}); place it in one or add the layer to the table"
        ))
        for source in _sources(package_dir, module_files)
        if layer_of(source.module, Path(package_dir).name, module_names) not in LAYERS
    ]


def _strongly_connected(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _shortest_cycle(graph: dict[str, dict[str, Import]], start: str, members: set[str]) -> list[str]:
    """Shortest path start -> ... -> start inside one strongly connected component."""
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node]):
            if child not in members:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return path[::-1] + [start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    raise AssertionError(f"no cycle through {start}")  # cannot happen in a component of two or more


def cycle_problems(imports: Sequence[Import], modules: Iterable[str]) -> list[Problem]:
    """(b) import cycles between modules (function-level imports included; TYPE_CHECKING ones not)."""
    modules = frozenset(modules)
    graph: dict[str, dict[str, Import]] = {module: {} for module in modules}
    for item in imports:
        if item.type_only:
            continue
        target = item.target
        while target and target not in modules:  # ``import pkg.mod.Class`` style: nearest module
            target = target.rpartition(".")[0]
        if target and target != item.importer:
            graph[item.importer].setdefault(target, item)
    problems = []
    for component in _strongly_connected(graph):
        if len(component) < 2:
            continue
        path = _shortest_cycle(graph, component[0], set(component))
        steps = "; ".join(
            f"{graph[a][b].file}:{graph[a][b].line} imports {b}" for a, b in zip(path, path[1:])
        )
        extra = f" (all of {', '.join(component)} are tied together)" if len(component) > len(path) - 1 else ""
        problems.append(Problem("cycle", f"import cycle {' -> '.join(path)}: {steps}{extra}"))
    return problems


def check_package(package_dir: Path, module_files: Sequence[Path] = ()) -> list[Problem]:
    """Every problem of the package under ``package_dir`` (and of the top-level ``module_files``)."""
    package_dir = Path(package_dir)
    imports, problems = collect_imports(package_dir, module_files)
    module_names = [Path(path).stem for path in module_files]
    modules = {source.module for source in _sources(package_dir, module_files)}
    return (
        problems
        + unplaced_problems(package_dir, module_files)
        + layer_problems(imports, package_dir.name, module_names)
        + cycle_problems(imports, modules)
    )


def _report(problems: Sequence[Problem], kind: str) -> list[str]:
    return [problem.message for problem in problems if problem.kind == kind]


# --------------------------------------------------------------------------------------------------
# The real tree


@pytest.fixture(scope="module")
def real_problems() -> list[Problem]:
    return check_package(LIB_DIR, [MODULE_FILE])


def test_the_table_names_every_layer_folder() -> None:
    folders = {p.name for p in LIB_DIR.iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(FOLDER_LAYERS)
    top_files = {p.name for p in LIB_DIR.glob("*.py")}
    assert top_files == {"__init__.py", "__main__.py"}


def test_the_collector_sees_function_level_and_relative_imports() -> None:
    """A checker that finds nothing passes everything: make sure it sees what is really there."""
    imports, problems = collect_imports(LIB_DIR, [MODULE_FILE])
    assert not problems
    found = {(i.file, i.target, i.in_function) for i in imports}
    assert ("__main__.py", "UNet3DSegmentLib.cli.main", False) in found  # absolute
    assert ("cli/main.py", "UNet3DSegmentLib", False) in found  # from .. import __version__
    assert ("cli/web.py", "UNet3DSegmentLib.web.app", True) in found  # relative, in a function
    assert ("UNet3DSegment.py", "UNet3DSegmentLib.client.phantom", False) in found  # from pkg import module
    assert ("mrml/logic.py", "slicer", False) in found


def test_no_upward_imports(real_problems: list[Problem]) -> None:
    problems = _report(real_problems, "layer")
    assert not problems, "\n".join(problems)


def test_no_import_cycles(real_problems: list[Problem]) -> None:
    problems = _report(real_problems, "cycle")
    assert not problems, "\n".join(problems)


def test_slicer_qt_vtk_and_trame_only_where_allowed(real_problems: list[Problem]) -> None:
    problems = _report(real_problems, "framework")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------------
# The checker fails when it should


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


def test_checker_reports_upward_imports_cycles_and_frameworks(tmp_path: Path) -> None:
    package = tmp_path / "UNet3DSegmentLib"
    files = {"__init__.py": '__version__ = "0"\n', "__main__.py": "from UNet3DSegmentLib.cli.main import x\n"}
    files.update({f"{layer}/__init__.py": "" for layer in sorted(FOLDER_LAYERS)})
    files.update({
        "base/errors.py": "class Oops(Exception):\n    pass\n",
        "cli/main.py": "from .. import __version__\nfrom ..engine import ok\nx = 1\n",
        "engine/ok.py": "from ..base.errors import Oops\nfrom ..runtime import fine\n",
        "runtime/fine.py": "import UNet3DSegmentLib.base.errors\n",
        "engine/upward.py": """\
            import numpy as np


            def run():
                from ..cli.main import x
                return x
            """,
        "runtime/absolute.py": "import UNet3DSegmentLib.training.loop as loop\n",
        "training/loop.py": "",
        "engine/cycle_a.py": "from .cycle_b import y\nz = 1\n",
        "engine/cycle_b.py": "y = 2\n\n\ndef later():\n    from . import cycle_a\n    return cycle_a.z\n",
        "engine/viewer.py": "class Viewer:\n    import vtk\n",
        "runtime/web_bits.py": "def serve():\n    from trame.app import get_server\n",
        "mrml/logic.py": "import slicer\nimport vtk\nfrom ..client import helpers\n",
        "client/helpers.py": "from ..engine.ok import Oops\n",
    })
    _write(package, files)
    module_file = tmp_path / "UNet3DSegment.py"
    module_file.write_text("import qt\nfrom UNet3DSegmentLib.mrml.logic import slicer\nfrom UNet3DSegmentLib.web import app\n")

    problems = check_package(package, [module_file])
    assert sorted(_report(problems, "layer")) == [
        "UNet3DSegment.py:3 imports UNet3DSegmentLib.web: UNet3DSegment.py may not import web "
        "(UNet3DSegment.py may import base, client, engine, mrml)",
        "engine/upward.py:5 imports UNet3DSegmentLib.cli.main: engine may not import cli "
        "(engine may import base, runtime)",
        "runtime/absolute.py:1 imports UNet3DSegmentLib.training.loop: runtime may not import training "
        "(runtime may import base)",
    ]
    assert _report(problems, "cycle") == [
        "import cycle UNet3DSegmentLib.engine.cycle_a -> UNet3DSegmentLib.engine.cycle_b -> "
        "UNet3DSegmentLib.engine.cycle_a: engine/cycle_a.py:1 imports UNet3DSegmentLib.engine.cycle_b; "
        "engine/cycle_b.py:5 imports UNet3DSegmentLib.engine.cycle_a"
    ]
    assert sorted(_report(problems, "framework")) == [
        "engine/viewer.py:2 imports vtk: engine may not import vtk "
        "(only mrml/, web/ and UNet3DSegment.py may import slicer, qt, ctk or vtk)",
        "runtime/web_bits.py:2 imports trame.app: runtime may not import trame "
        "(base, engine, runtime stay free of the web UI)",
    ]


def test_checker_reports_modules_outside_the_table(tmp_path: Path) -> None:
    package = tmp_path / "UNet3DSegmentLib"
    _write(package, {"__init__.py": "", "utils/__init__.py": "", "utils/misc.py": "import os\n",
                     "helpers.py": "from .base import errors\n", "base/__init__.py": "", "base/errors.py": "",
                     "engine/__init__.py": "", "engine/x.py": "from ...outside import y\n"})
    messages = [problem.message for problem in check_package(package)]
    assert "engine/x.py:1 has a relative import (level 3) beyond the top-level package" in messages
    assert any(m.startswith("utils/__init__.py: module UNet3DSegmentLib.utils is in no layer") for m in messages)
    assert any(m.startswith("utils/misc.py: module UNet3DSegmentLib.utils.misc is in no layer") for m in messages)
    assert any(m.startswith("helpers.py: module UNet3DSegmentLib.helpers is in no layer") for m in messages)


def test_type_checking_imports_count_for_layers_but_not_for_cycles(tmp_path: Path) -> None:
    package = tmp_path / "UNet3DSegmentLib"
    files = {"__init__.py": ""}
    files.update({f"{layer}/__init__.py": "" for layer in sorted(FOLDER_LAYERS)})
    files.update({
        "engine/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n",
        "engine/b.py": "from .a import A\n",
        "base/x.py": "import typing\nif typing.TYPE_CHECKING:\n    from ..engine.a import A\n",
    })
    _write(package, files)
    problems = check_package(package)
    assert _report(problems, "cycle") == []
    assert _report(problems, "layer") == [
        "base/x.py:3 imports UNet3DSegmentLib.engine.a: base may not import engine "
        "(base may import nothing of the package)"
    ]


# --------------------------------------------------------------------------------------------------
# At run time: what importing really loads

FORBIDDEN_AT_IMPORT = ("slicer", "qt", "ctk", "vtk", "vtkmodules", "trame", "trame_slicer",
                       "tensorflow", "keras", "torch", "jax")
NON_UI_LAYERS = ("base", "runtime", "engine", "client", "training", "cli")


def _run_python(code: str) -> str:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(LIB_DIR.parent), environment.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def imported_after(code: str) -> set[str]:
    """Top-level module names imported by a fresh interpreter after running ``code``."""
    probe = code + "\nimport sys, json\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    return set(json.loads(_run_python(probe)))


def non_ui_modules() -> list[str]:
    """Every module of the layers below the user interfaces (training and cli load TF in functions only)."""
    names = []
    for layer in NON_UI_LAYERS:
        for path in sorted((LIB_DIR / layer).rglob("*.py")):
            parts = ("UNet3DSegmentLib",) + path.relative_to(LIB_DIR).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_importing_the_non_ui_layers_loads_no_ui_or_framework() -> None:
    modules = non_ui_modules()
    assert "UNet3DSegmentLib.engine.pipeline" in modules and "UNet3DSegmentLib.cli.main" in modules
    probe = textwrap.dedent(f"""\
        import importlib, json, sys
        forbidden = {FORBIDDEN_AT_IMPORT!r}
        first = {{}}
        for name in {modules!r}:
            importlib.import_module(name)
            for top in forbidden:
                if top in sys.modules and top not in first:
                    first[top] = name
        print(json.dumps(first))
        """)
    loaded_by = json.loads(_run_python(probe))
    assert not loaded_by, f"loaded at import (framework: first module that loaded it): {loaded_by}"


def test_help_does_not_import_tensorflow() -> None:
    code = (
        "from UNet3DSegmentLib.cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "for c in ['segment']:\n"
        "    try:\n        main([c, '--help'])\n    except SystemExit:\n        pass\n"
    )
    loaded = imported_after(code)
    assert "tensorflow" not in loaded and "keras" not in loaded


def test_package_import_is_cheap() -> None:
    """Importing the package itself loads neither TensorFlow nor SimpleITK."""
    loaded = imported_after("import UNet3DSegmentLib")
    assert "tensorflow" not in loaded and "SimpleITK" not in loaded
