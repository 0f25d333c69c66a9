"""Build a stand-in widget tree from a Qt Designer ``.ui`` file: classes, names, properties, connections.

What ``slicer.util.loadUI`` gives a module: the root widget with every child named as in the file.
A class the stand-ins do not know, or a property a widget lacks, fails the load: a renamed or
retyped widget in the ``.ui`` must break the tests as it would break the panel.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from . import ctk, mrml_widgets, qt

WIDGET_CLASSES: dict[str, type] = {
    cls.__name__: cls
    for module in (qt, ctk, mrml_widgets)
    for cls in vars(module).values()
    if isinstance(cls, type) and issubclass(cls, qt.QWidget)
}
RANGE_FIRST = ("minimum", "maximum", "decimals", "singleStep")  # before "value", as Qt needs
LAYOUT_ONLY = {"sizeHint", "orientation", "geometry", "sizePolicy", "minimumSize", "maximumSize", "alignment",
               "frameShape", "textFormat", "buttonSymbols", "suffix", "prefix", "pageStep", "tracking",
               "sizeAdjustPolicy"}


def _value(element: ElementTree.Element) -> Any:
    child = list(element)[0]
    tag, text = child.tag, child.text or ""
    if tag in ("string", "cstring", "enum", "set"):
        return text
    if tag == "bool":
        return text.strip() == "true"
    if tag == "number":
        return int(text)
    if tag == "double":
        return float(text)
    if tag == "stringlist":
        return [s.text or "" for s in child.findall("string")]
    return None  # size, rect, font...: nothing a test reads


def _apply_properties(widget: qt.QWidget, element: ElementTree.Element, source: Path) -> None:
    properties = [p for p in element.findall("property")]
    properties.sort(key=lambda p: 0 if p.get("name") in RANGE_FIRST else 1)
    for prop in properties:
        name, value = prop.get("name"), _value(prop)
        if prop.get("stdset") == "0":
            widget.setProperty(name, value)  # dynamic property (SlicerParameterName)
        elif name in LAYOUT_ONLY or value is None:
            continue
        elif hasattr(widget, name):
            setattr(widget, name, value)
        else:
            raise AttributeError(f"{source.name}: {type(widget).__name__} {widget.objectName!r} has no property {name!r}")


def _build(element: ElementTree.Element, parent: Optional[qt.QObject], source: Path) -> qt.QWidget:
    className, name = element.get("class"), element.get("name", "")
    if className not in WIDGET_CLASSES:
        raise TypeError(f"{source.name}: widget {name!r} has class {className!r}, which the stand-ins do not provide")
    widget = WIDGET_CLASSES[className](parent)
    widget.objectName = name
    _apply_properties(widget, element, source)
    _build_children(element, widget, source)
    return widget


def _build_children(element: ElementTree.Element, parent: qt.QWidget, source: Path) -> None:
    """Widgets below ``element``, through layouts and items, become children of ``parent``."""
    for child in element:
        if child.tag == "widget":
            _build(child, parent, source)
        elif child.tag in ("layout", "item"):
            _build_children(child, parent, source)


def load_ui(path: str | Path) -> qt.QWidget:
    """The root widget of ``path``, with its children and the file's signal/slot connections made."""
    source = Path(path)
    tree = ElementTree.parse(source)
    root = _build(tree.getroot().find("widget"), None, source)
    byName = {w.objectName: w for w in [root] + root.findChildren(qt.QWidget)}
    for connection in tree.getroot().iter("connection"):
        sender, receiver = byName[connection.findtext("sender")], byName[connection.findtext("receiver")]
        slot = connection.findtext("slot").split("(", 1)[0]
        sender.connect(connection.findtext("signal"), getattr(receiver, slot))
    return root


def child_widget_variables(widget: qt.QWidget) -> SimpleNamespace:
    """``slicer.util.childWidgetVariables``: one attribute per named child."""
    return SimpleNamespace(**{w.objectName: w for w in widget.findChildren(qt.QObject) if w.objectName})
