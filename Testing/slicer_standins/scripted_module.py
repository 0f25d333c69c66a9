"""Stand-in for ``slicer.ScriptedLoadableModule``: the base classes a scripted module derives from.

Behaviour emulated from Slicer 5.8-5.12 (Base/Python/slicer/ScriptedLoadableModule.py): every base
``__init__`` calls ``super().__init__()`` (so a logic mixin's own ``__init__`` runs); the widget's
parent is a ``qMRMLWidget`` whose layout receives the panel (a widget made without a parent is set
up at once, as Slicer does; the module loader passes a parent and calls ``setup`` itself); ``resourcePath`` is relative to the
module file's ``Resources`` folder; the logic's parameter node is the scene's singleton
``vtkMRMLScriptedModuleNode`` tagged with the module name, created on first use.
"""

from __future__ import annotations

import os
import sys
import unittest
from typing import Any, Optional

from .mrml_widgets import qMRMLWidget


def _resource(instance: Any, filename: str) -> str:
    folder = os.path.dirname(os.path.abspath(sys.modules[type(instance).__module__].__file__))
    return os.path.join(folder, "Resources", filename)


class _ModuleParent:
    """The ``parent`` (qSlicerScriptedLoadableModule) a module's ``__init__`` fills in."""

    def __init__(self) -> None:
        self.title = ""
        self.categories: list[str] = []
        self.dependencies: list[str] = []
        self.contributors: list[str] = []
        self.helpText = ""
        self.acknowledgementText = ""


class ScriptedLoadableModule:
    def __init__(self, parent: Any) -> None:
        super().__init__()
        self.parent = parent
        self.moduleName = type(self).__name__

    def resourcePath(self, filename: str) -> str:
        return _resource(self, filename)


class ScriptedLoadableModuleWidget:
    def __init__(self, parent: Optional[Any] = None) -> None:
        super().__init__()
        self.moduleName = type(self).__name__.removesuffix("Widget")
        self.parent = parent if parent is not None else qMRMLWidget()
        self.layout = self.parent.layout()
        if parent is None:  # built by hand, not by the module loader: Slicer sets it up at once
            import slicer

            self.parent.setMRMLScene(slicer.mrmlScene)
            self.setup()

    def resourcePath(self, filename: str) -> str:
        return _resource(self, filename)

    def setup(self) -> None:
        pass

    def cleanup(self) -> None:
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent: Optional[Any] = None) -> None:
        super().__init__()
        self.moduleName = type(self).__name__.removesuffix("Logic")
        self.isSingletonParameterNode = True

    def getParameterNode(self) -> Any:
        import slicer

        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            node = slicer.mrmlScene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message: str, requestedDelay: Optional[int] = None, msec: Optional[int] = None) -> None:
        import slicer

        slicer.util.delayDisplay(message)
