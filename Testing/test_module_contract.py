"""Contracts between the Slicer module's files, checked without Slicer.

The module file, its Qt Designer panel, its parameter node, the CMake lists and the extension
metadata must agree; a mismatch only shows up inside Slicer (a widget missing at run time, a file
missing from the package, a parameter bound to nothing), so it is caught here by reading the files.
"""

from __future__ import annotations

import ast
import enum
import importlib
import json
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = ROOT / "UNet3DSegment"
MODULE_FILE = MODULE_DIR / "UNet3DSegment.py"
LIB_DIR = MODULE_DIR / "UNet3DSegmentLib"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "UNet3DSegment.ui"
ICON_FILE = MODULE_DIR / "Resources" / "Icons" / "UNet3DSegment.png"
REQUIREMENTS_FILE = MODULE_DIR / "Resources" / "requirements.txt"

# Which widget class a parameter of each type can be bound to (Slicer 5.8's guiConnectors.py).
CONNECTABLE = {
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton", "ctkCheckablePushButton"},
    "int": {"QSpinBox", "QSlider"},
    "float": {"ctkSliderWidget", "QDoubleSpinBox", "ctkDoubleSpinBox", "qMRMLSliderWidget", "qMRMLSpinBox"},
    "str": {"QLineEdit", "QLabel", "QTextEdit"},
    "pathlib.Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "enum": {"QComboBox", "ctkComboBox"},
    "node": {"qMRMLNodeComboBox"},
}


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def ui_root() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def ui_widgets() -> dict[str, str]:
    """Every named widget of the panel: name -> class."""
    return {w.get("name"): w.get("class") for w in ui_root().iter("widget")}


def ui_parameter_bindings() -> dict[str, str]:
    """SlicerParameterName -> class of the widget that carries it."""
    bindings = {}
    for widget in ui_root().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                name = prop.find("string").text
                assert name not in bindings, f"parameter {name} bound twice"
                bindings[name] = widget.get("class")
    return bindings


def enum_classes(tree: ast.Module) -> set[str]:
    """Enums the module defines, or imports from the Lib (the panel's enums are made from the options schema)."""
    names = {
        node.name
        for node in tree.body
        if isinstance(node, ast.ClassDef) and any(ast.unparse(b) in ("enum.Enum", "Enum") for b in node.bases)
    }
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("UNet3DSegmentLib"):
            module = importlib.import_module(node.module)
            names |= {a.name for a in node.names
                      if isinstance(getattr(module, a.name, None), type) and issubclass(getattr(module, a.name), enum.Enum)}
    return names


def declared_parameters() -> dict[str, str]:
    """Parameters of the @parameterNodeWrapper class: name -> kind (a key of CONNECTABLE)."""
    tree = module_tree()
    enums = enum_classes(tree)
    wrappers = [
        node for node in tree.body
        if isinstance(node, ast.ClassDef)
        and any(ast.unparse(d) == "parameterNodeWrapper" for d in node.decorator_list)
    ]
    assert len(wrappers) == 1, "expected exactly one @parameterNodeWrapper class"
    parameters = {}
    for statement in wrappers[0].body:
        if isinstance(statement, ast.AnnAssign):
            annotation = ast.unparse(statement.annotation)
            base = re.sub(r"^Annotated\[([^,\]]+).*$", r"\1", annotation).strip()
            if base.startswith("vtkMRML"):
                kind = "node"
            elif base in enums or base.startswith("choiceEnum("):  # an Enum made from an option's choices
                kind = "enum"
            else:
                kind = base
            parameters[statement.target.id] = kind
    return parameters


def cmake_listed_files() -> list[str]:
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = []
    for block in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
        body = re.search(rf"set\({block}\s(.*?)\)", text, re.S).group(1)
        listed += [item.replace("${MODULE_NAME}", "UNet3DSegment") for item in body.split()]
    return listed


def test_every_ui_name_the_module_uses_exists_in_the_panel() -> None:
    used = {
        node.attr
        for node in ast.walk(module_tree())
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "ui"
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "self"
    }
    widgets = ui_widgets()
    assert len(used) >= 15  # the module really uses the panel through self.ui
    assert sorted(used - set(widgets)) == []


def test_every_slicer_parameter_name_maps_to_a_declared_parameter_of_a_bindable_type() -> None:
    bindings = ui_parameter_bindings()
    parameters = declared_parameters()
    assert sorted(set(bindings) - set(parameters)) == []  # a widget bound to nothing
    assert sorted(set(parameters) - set(bindings)) == []  # a parameter with no widget
    for name, widget_class in bindings.items():
        kind = parameters[name]
        assert widget_class in CONNECTABLE[kind], f"{name}: {kind} cannot bind to {widget_class}"


def test_float_sliders_are_bounded_as_the_connector_requires() -> None:
    source = MODULE_FILE.read_text(encoding="utf-8")
    for name, widget_class in ui_parameter_bindings().items():
        if widget_class == "ctkSliderWidget":
            assert re.search(rf"{name}: Annotated\[float, WithinRange\(", source), name


def test_every_node_selector_gets_the_scene() -> None:
    root = ui_root()
    assert root.find("widget").get("class") == "qMRMLWidget"
    assert root.find("widget").get("name") == "UNet3DSegment"
    receivers = {
        c.find("receiver").text
        for c in root.iter("connection")
        if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"
        and c.find("sender").text == "UNet3DSegment"
    }
    selectors = {n for n, c in ui_widgets().items() if c == "qMRMLNodeComboBox"}
    assert selectors == receivers and len(selectors) == 5
    custom = {c.find("class").text for c in root.iter("customwidget")}
    assert {c for c in ui_widgets().values() if not c.startswith("Q")} <= custom


def test_every_file_cmake_lists_exists_and_every_module_file_is_listed() -> None:
    listed = cmake_listed_files()
    missing = [item for item in listed if not (MODULE_DIR / item).is_file()]
    assert missing == []
    python_files = {"UNet3DSegment.py"} | {str(p.relative_to(MODULE_DIR)) for p in LIB_DIR.rglob("*.py")}
    not_for_slicer = {f for f in python_files if f.split("/")[1:2] in (["training"], ["web"])}
    resources = {str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    assert len(not_for_slicer) >= 5  # the training code and the web app exist, and are left out
    assert sorted(python_files - not_for_slicer - set(listed)) == []
    assert sorted(not_for_slicer & set(listed)) == []
    assert sorted(resources - set(listed)) == []
    assert len(listed) == len(set(listed))


def test_module_cmake_builds_the_scripted_module_with_its_tests() -> None:
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"slicerMacroBuildScriptedModule\(.*WITH_GENERIC_TESTS.*\)", text, re.S)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "project(UNet3DSegment)" in top and "add_subdirectory(UNet3DSegment)" in top
    for field in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(rf'set\(EXTENSION_{field} "[^"]+"\)', top), field
    assert 'set(EXTENSION_DEPENDS "NA")' in top
    assert "include(${Slicer_EXTENSION_GENERATE_CONFIG})" in top and "include(${Slicer_EXTENSION_CPACK})" in top


def test_s4ext_has_the_fields_slicer_reads() -> None:
    fields = {}
    for line in (ROOT / "UNet3DSegment.s4ext").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    required = ["scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
                "category", "iconurl", "status", "description", "screenshoturls", "enabled"]
    assert [k for k in required if not fields.get(k)] == []
    assert fields["scm"] == "git" and fields["depends"] == "NA" and fields["enabled"] in ("0", "1")
    assert fields["category"] == "Segmentation"


@pytest.mark.parametrize("path", [MODULE_FILE, *sorted(LIB_DIR.rglob("*.py"))],
                         ids=lambda p: str(p.relative_to(MODULE_DIR)))
def test_python_files_parse_as_python_3_9(path: Path) -> None:
    """Slicer 5.8 bundles Python 3.9: no 3.10+ syntax, and no ``X | Y`` in annotations evaluated at run time."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, feature_version=(3, 9))
    if "from __future__ import annotations" in source:
        return
    annotations = [n.annotation for n in ast.walk(tree) if isinstance(n, (ast.AnnAssign, ast.arg)) and n.annotation]
    annotations += [n.returns for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and n.returns]
    unions = [ast.unparse(a) for a in annotations if any(isinstance(n, ast.BinOp) for n in ast.walk(a))]
    assert unions == []


def test_module_file_keeps_the_template_shape() -> None:
    tree = module_tree()
    classes = {node.name: [ast.unparse(b) for b in node.bases] for node in tree.body if isinstance(node, ast.ClassDef)}
    assert classes["UNet3DSegment"] == ["ScriptedLoadableModule"]
    assert classes["UNet3DSegmentWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert classes["UNet3DSegmentLogic"][0] == "ScriptedLoadableModuleLogic"
    assert classes["UNet3DSegmentTest"] == ["ScriptedLoadableModuleTest"]
    assert "UNet3DSegmentParameterNode" in classes
    # GUI wiring only (panel, result table, log, install dialogs, self-test); the rest lives in the Lib.
    assert len(MODULE_FILE.read_text(encoding="utf-8").splitlines()) < 520
    # Nothing installs packages when the module is imported (generic tests import and build it).
    top_level_calls = [ast.unparse(n) for n in tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)]
    assert top_level_calls == []


def test_requirements_never_replace_slicers_own_packages() -> None:
    lines = [l.split("#")[0].strip() for l in REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines()]
    names = {re.split(r"[<>=!~\[ ;]", l)[0].lower() for l in lines if l}
    assert "tensorflow" in names
    assert names.isdisjoint({"numpy", "simpleitk", "vtk"})


def test_icon_is_a_128_pixel_png() -> None:
    data = ICON_FILE.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)


def test_license_is_apache_2() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_panel_parameters_take_ranges_defaults_and_enums_from_the_options_schema() -> None:
    """Each panel parameter named after a segment option is that option: same range, default and choices."""
    from UNet3DSegmentLib.base.options import SegmentOptions
    from UNet3DSegmentLib.client import panel_options

    source = MODULE_FILE.read_text(encoding="utf-8")
    bound = [o for o in SegmentOptions.OPTIONS.values() if o.camel in declared_parameters()]
    assert {o.name for o in bound} >= {"overlap", "batch_size", "blend", "device", "precision", "backend", "tta",
                                       "largest_component", "gpu_memory_limit"}
    for declared in bound:
        line = next(l for l in source.splitlines() if l.strip().startswith(f"{declared.camel}:"))
        assert f'default("{declared.name}")' in line, line  # no default written twice
        if declared.kind in (int, float) and not declared.is_size:
            assert f'WithinRange(*panel_range("{declared.name}"))' in line, line
        if declared.choices:
            assert f'choiceEnum("{declared.name}")' in line, line
    assert [e.value for e in panel_options.Precision] == list(SegmentOptions.spec("precision").choices)
    assert panel_options.Device("gpu").label() == "GPU"
    assert panel_options.panel_range("overlap") == (-0.05, 0.95)  # the lowest notch: "Model's choice"
    assert panel_options.default("gpu_memory_limit") == ""


def test_no_choice_list_is_written_twice() -> None:
    """Each option's list of choices appears in one file only: base/options.py."""
    from UNet3DSegmentLib.base.options import JobOptions, SegmentOptions, TrainOptions

    lists = [o.choices for group in (SegmentOptions, JobOptions, TrainOptions) for o in group.OPTIONS.values()
             if len(o.choices) >= 2]
    sources = {p: p.read_text(encoding="utf-8") for p in [MODULE_FILE, *LIB_DIR.rglob("*.py")]}
    for choices in lists:
        spelled = [re.escape(repr(c)) for c in choices]
        pattern = re.compile(r"\s*,\s*".join(spelled).replace("'", "[\"']"))
        holders = sorted(str(p.relative_to(MODULE_DIR)) for p, text in sources.items() if pattern.search(text))
        assert set(holders) <= {"UNet3DSegmentLib/base/options.py"}, (choices, holders)


def test_no_function_of_the_module_file_binds_a_slicer_module_name_locally() -> None:
    """``import slicer.packaging`` inside a function makes ``slicer`` local to it: on Slicer 5.8/5.10, which lack
    slicer.packaging, the fallback then raised UnboundLocalError on ``slicer.util``. No function may bind these."""
    shared = {"slicer", "qt", "ctk", "vtk"}
    offenders = []
    for function in ast.walk(module_tree()):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            bound = []
            if isinstance(node, ast.Import):
                bound = [(a.asname or a.name.split(".")[0]) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                bound = [a.asname or a.name for a in node.names]
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                bound = [t.id for t in targets if isinstance(t, ast.Name)]
            offenders += [f"{function.name}:{node.lineno} binds {name}" for name in bound if name in shared]
    assert offenders == []
