"""Stand-in for ``slicer.parameterNodeWrapper``: typed fields stored in a real MRML parameter node.

What the module relies on, as Slicer 5.8-5.12 provide it: ``@parameterNodeWrapper`` on a class of
annotated fields with defaults; ``Wrapper(node)`` reads and writes the node's parameters (values as
text, nodes as node references); ``WithinRange`` bounds numbers (a value outside raises);
``connectGui(ui)`` binds each widget whose ``SlicerParameterName`` property names a field (an unknown
name raises ``ValueError``; a widget that cannot show the field's type raises ``RuntimeError``), both
ways, and returns a tag for ``disconnectGui``. Enum fields fill a combo box from ``label()``.
"""

from __future__ import annotations

import enum
import pathlib
import typing
from typing import Any, Callable, Optional

import vtk

from . import ctk, mrml_widgets, qt

PROPERTY = "SlicerParameterName"


class WithinRange:
    def __init__(self, minimum: float, maximum: float) -> None:
        self.minimum, self.maximum = minimum, maximum

    def check(self, name: str, value: Any) -> None:
        if not (self.minimum <= value <= self.maximum):
            raise ValueError(f"{name}: value {value} is not within [{self.minimum}, {self.maximum}]")


def _unannotated(datatype: Any) -> tuple[Any, list]:
    if typing.get_origin(datatype) is typing.Annotated:
        base, *extras = typing.get_args(datatype)
        return base, list(extras)
    return datatype, []


def _is_node_type(datatype: Any) -> bool:
    return isinstance(datatype, type) and datatype.__name__.startswith("vtkMRML")


class _Field:
    def __init__(self, name: str, datatype: Any, default: Any) -> None:
        self.name = name
        self.type, extras = _unannotated(datatype)
        self.ranges = [e for e in extras if isinstance(e, WithinRange)]
        if default is _MISSING:
            default = self._type_default()
        self.default = default

    def _type_default(self) -> Any:
        if _is_node_type(self.type):
            return None
        if isinstance(self.type, type) and issubclass(self.type, enum.Enum):
            return next(iter(self.type))
        if self.type is pathlib.Path:
            return pathlib.Path()
        return self.type()

    def check(self, value: Any) -> Any:
        if _is_node_type(self.type):
            if value is not None and not value.IsA(self.type.__name__):
                raise TypeError(f"{self.name}: expected {self.type.__name__}, got {value.GetClassName()}")
            return value
        if isinstance(self.type, type) and issubclass(self.type, enum.Enum) and not isinstance(value, self.type):
            raise TypeError(f"{self.name}: expected a {self.type.__name__} member, got {value!r}")
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.type is pathlib.Path and isinstance(value, str):
            value = pathlib.Path(value)
        if self.type in (int, float, str, bool) and type(value) is not self.type:
            raise TypeError(f"{self.name}: expected {self.type.__name__}, got {value!r}")
        for bound in self.ranges:
            bound.check(self.name, value)
        return value

    def to_text(self, value: Any) -> str:
        if isinstance(value, enum.Enum):
            return value.name
        return str(value)

    def from_text(self, text: str) -> Any:
        if isinstance(self.type, type) and issubclass(self.type, enum.Enum):
            return self.type[text]
        if self.type is bool:
            return text == "True"
        if self.type is pathlib.Path:
            return pathlib.Path(text)
        return self.type(text)


_MISSING = object()


def parameterNodeWrapper(cls: type) -> type:
    """Turn ``cls`` (annotated fields with defaults) into a wrapper of a ``vtkMRMLScriptedModuleNode``."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {name: _Field(name, hint, cls.__dict__.get(name, _MISSING)) for name, hint in hints.items()}

    def __init__(self, parameterNode: Any) -> None:
        object.__setattr__(self, "parameterNode", parameterNode)
        object.__setattr__(self, "_guis", {})
        object.__setattr__(self, "_nextTag", 1)
        object.__setattr__(self, "_updatingGui", False)
        for field in fields.values():  # defaults written once, as Slicer does for unset parameters
            if not _is_node_type(field.type) and not parameterNode.GetParameter(field.name):
                parameterNode.SetParameter(field.name, field.to_text(field.default))

    def make_property(field: _Field) -> property:
        def getter(self: Any) -> Any:
            node = self.parameterNode
            if _is_node_type(field.type):
                return node.GetNodeReference(field.name)
            text = node.GetParameter(field.name)
            return field.from_text(text) if text != "" or field.type is str else field.default

        def setter(self: Any, value: Any) -> None:
            value = field.check(value)
            node = self.parameterNode
            if _is_node_type(field.type):
                node.SetNodeReferenceID(field.name, value.GetID() if value is not None else None)
            else:
                node.SetParameter(field.name, field.to_text(value))

        return property(getter, setter)

    def connectGui(self: Any, gui: Any) -> int:
        widgets = vars(gui).values() if not getattr(gui, "isWidgetType", lambda: False)() else gui.findChildren(qt.QWidget)
        mapping = {}
        for widget in widgets:
            name = widget.property(PROPERTY) if hasattr(widget, "property") else None
            if not name:
                continue
            if name not in fields:
                raise ValueError(f"Cannot find a param with the given name: {name}")
            mapping[name] = _connector(widget, fields[name])
        tag = self._nextTag
        object.__setattr__(self, "_nextTag", tag + 1)
        self._guis[tag] = mapping
        for name, connector in mapping.items():
            connector.write(getattr(self, name))
            connector.on_changed(_gui_to_parameter(self, name, connector))
        observer = self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: _write_all(self))
        mapping["__observer__"] = observer
        return tag

    def disconnectGui(self: Any, tag: int) -> None:
        mapping = self._guis.pop(tag, None)
        if mapping is None:
            return
        mapping.pop("__observer__")  # Slicer leaves its node observer in place (it then finds no GUI)
        for connector in mapping.values():
            connector.on_changed(None)

    def _write_all(self: Any) -> None:
        if self._updatingGui:
            return
        object.__setattr__(self, "_updatingGui", True)
        try:
            for mapping in self._guis.values():
                for name, connector in mapping.items():
                    if name != "__observer__":
                        connector.write(getattr(self, name))
        finally:
            object.__setattr__(self, "_updatingGui", False)

    def _gui_to_parameter(self: Any, name: str, connector: "_Connector") -> Callable[[], None]:
        def callback(*args: Any) -> None:
            if not self._updatingGui:
                setattr(self, name, connector.read())
        return callback

    namespace = {name: make_property(field) for name, field in fields.items()}
    namespace.update(
        __init__=__init__, connectGui=connectGui, disconnectGui=disconnectGui,
        AddObserver=lambda self, *a: self.parameterNode.AddObserver(*a),
        RemoveObserver=lambda self, *a: self.parameterNode.RemoveObserver(*a),
        StartModify=lambda self: self.parameterNode.StartModify(),
        EndModify=lambda self, was: self.parameterNode.EndModify(was),
        default=lambda self, name: fields[name].default,
        allParameters=fields, __doc__=cls.__doc__, __module__=cls.__module__, __qualname__=cls.__qualname__,
    )
    return type(cls.__name__, (), namespace)


class _Connector:
    """One widget bound to one field: ``write`` shows a value, ``read`` gets the user's, ``on_changed``."""

    signal = ""

    def __init__(self, widget: Any, field: _Field) -> None:
        self.widget, self.field, self._callback = widget, field, None

    def on_changed(self, callback: Optional[Callable[..., None]]) -> None:
        if self._callback is not None:
            self.widget.disconnect(self.signal, self._callback)
        self._callback = callback
        if callback is not None:
            self.widget.connect(self.signal, callback)

    def write(self, value: Any) -> None:
        raise NotImplementedError

    def read(self) -> Any:
        raise NotImplementedError


class _CheckBox(_Connector):
    signal = "stateChanged(int)"  # what Slicer's QCheckBox connector listens to (before toggled)

    def write(self, value: Any) -> None:
        self.widget.checked = value

    def read(self) -> Any:
        return self.widget.checked


class _Number(_Connector):
    signal = "valueChanged(double)"

    def __init__(self, widget: Any, field: _Field) -> None:
        super().__init__(widget, field)
        if field.ranges:
            widget.minimum, widget.maximum = field.ranges[0].minimum, field.ranges[0].maximum
        elif isinstance(widget, ctk.ctkSliderWidget):
            raise RuntimeError("Cannot have a connection to ctkSliderWidget where the float types is unbounded.")

    def write(self, value: Any) -> None:
        self.widget.value = value

    def read(self) -> Any:
        return self.field.type(self.widget.value)


class _LineEdit(_Connector):
    signal = "textChanged(QString)"

    def write(self, value: Any) -> None:
        self.widget.text = value

    def read(self) -> Any:
        return self.widget.text


class _Path(_Connector):
    signal = "currentPathChanged(QString)"

    def write(self, value: Any) -> None:
        self.widget.currentPath = "" if str(value) in ("", ".") else str(value)

    def read(self) -> Any:
        return pathlib.Path(self.widget.currentPath)


class _Enum(_Connector):
    signal = "currentIndexChanged(int)"

    def __init__(self, widget: Any, field: _Field) -> None:
        super().__init__(widget, field)
        label = getattr(field.type, "label", lambda member: member.name)
        self.members = list(field.type)
        widget.clear()
        for member in self.members:
            widget.addItem(label(member))

    def write(self, value: Any) -> None:
        self.widget.currentIndex = self.members.index(value)

    def read(self) -> Any:
        return self.members[self.widget.currentIndex]


class _Node(_Connector):
    signal = "currentNodeChanged(vtkMRMLNode*)"

    def write(self, value: Any) -> None:
        if value is None and not self.widget.noneEnabled and self.widget.nodes():
            return  # the combo box keeps its (first) node; the read-back writes it to the parameter
        self.widget.setCurrentNode(value)

    def read(self) -> Any:
        return self.widget.currentNode()


def _connector(widget: Any, field: _Field) -> _Connector:
    kind = field.type
    if kind is bool and type(widget) in (qt.QCheckBox, ctk.ctkCheckBox):
        return _CheckBox(widget, field)
    if kind is int and type(widget) in (qt.QSpinBox, qt.QSlider):
        return _Number(widget, field)
    if kind is float and type(widget) in (qt.QDoubleSpinBox, ctk.ctkSliderWidget):
        return _Number(widget, field)
    if kind is str and type(widget) is qt.QLineEdit:
        return _LineEdit(widget, field)
    if kind is pathlib.Path and type(widget) is ctk.ctkPathLineEdit:
        return _Path(widget, field)
    if isinstance(kind, type) and issubclass(kind, enum.Enum) and type(widget) is qt.QComboBox:
        return _Enum(widget, field)
    if _is_node_type(kind) and type(widget) is mrml_widgets.qMRMLNodeComboBox:
        return _Node(widget, field)
    raise RuntimeError(f"Unable to create GUI connector from datatype '{kind}' to widget type '{type(widget)}'")
