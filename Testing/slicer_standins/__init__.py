"""Stand-ins for what a Slicer application gives a scripted module, over the real MRML of ``slicer-core``.

``install(monkeypatch, line, root)`` makes ``import qt``, ``import ctk``, ``import slicer`` (with
``slicer.app``, ``slicer.mrmlScene``, ``slicer.util``, ``slicer.ScriptedLoadableModule``,
``slicer.parameterNodeWrapper``, ``slicer.i18n`` and, from Slicer 5.12 on, ``slicer.packaging``)
behave as in the chosen Slicer line, and returns a ``StandInSlicer`` that records what the module
did: dialogs shown (with the cursor state at that moment), pip calls, delayDisplay messages, errors
raised inside Qt slots. MRML nodes, the scene, storage and segmentation logic are Slicer's own
(``slicer-core``); ``vtk`` is the real VTK. Nothing here copies Slicer's code: the behaviour was
read from Slicer's sources (Base/Python/slicer/*.py at v5.8.0, v5.10.0, v5.12.0) and re-stated.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Optional

from . import ctk as ctk_standin
from . import mrml_widgets, parameter_node, qt as qt_standin, scripted_module, signals, ui_loader

LINES = ("5.8", "5.10", "5.12")


class UnexpectedDialog(AssertionError):
    pass


class App:
    """``slicer.app``: testing flag, folders, override cursor depth, event processing."""

    def __init__(self, home: Path, temporary: Path, testing: bool) -> None:
        self.slicerHome = str(home)
        self.temporaryPath = str(temporary)
        self.applicationName = "Slicer"
        self.testing = testing
        self.cursorDepth = 0
        self.processed = 0

    def testingEnabled(self) -> bool:
        return self.testing

    def commandOptions(self) -> Any:
        return types.SimpleNamespace(testingEnabled=self.testing)

    def setOverrideCursor(self, cursor: int) -> None:
        self.cursorDepth += 1

    def restoreOverrideCursor(self) -> None:
        if self.cursorDepth == 0:
            raise AssertionError("restoreOverrideCursor without setOverrideCursor")
        self.cursorDepth -= 1

    def processEvents(self) -> None:
        self.processed += 1


class StandInSlicer:
    """The installed stand-ins and what the module did with them."""

    def __init__(self, line: str, app: App, util: types.ModuleType, scene: Any) -> None:
        self.line = line
        self.app = app
        self.util = util
        self.scene = scene
        self.calls: list[tuple[str, Any]] = []  # (function, text or arguments), in order
        self.answers: list[bool] = []  # confirmOkCancelDisplay answers when not testing
        self.pipFails = False
        self.torchExtension: Optional[types.ModuleType] = None

    def called(self, name: str) -> list[Any]:
        return [value for function, value in self.calls if function == name]

    def slotErrors(self) -> list[BaseException]:
        return list(signals.SLOT_ERRORS)


def _make_util(real_util: types.ModuleType, state: "StandInSlicer") -> types.ModuleType:
    util = types.ModuleType("slicer.util")
    util.__dict__.update({k: v for k, v in vars(real_util).items() if not k.startswith("__")})

    def record(name: str, value: Any) -> None:
        state.calls.append((name, value))

    def confirmOkCancelDisplay(text: str, windowTitle: Optional[str] = None, parent: Any = None, **kwargs: Any) -> bool:
        record("confirmOkCancelDisplay", text)
        record("cursorDepthAtDialog", state.app.cursorDepth)
        if state.app.testing:
            # Slicer skips the dialog under --testing and hands back True, which it then compares with
            # QMessageBox.Ok: the answer a module gets there is *not* OK (5.8-5.12 util.py).
            return True == qt_standin.QMessageBox.Ok  # noqa: E712
        if not state.answers:
            raise UnexpectedDialog(f"unexpected confirmation dialog: {text}")
        return state.answers.pop(0)

    def display(name: str):
        def show(text: str, windowTitle: Optional[str] = None, parent: Any = None, **kwargs: Any) -> None:
            record(name, text)
            record("cursorDepthAtDialog", state.app.cursorDepth)
        return show

    @contextlib.contextmanager
    def tryWithErrorDisplay(message: Optional[str] = None, show: bool = True, waitCursor: bool = False):
        if waitCursor:
            state.app.setOverrideCursor(qt_standin.Qt.WaitCursor)
        try:
            yield
        except Exception as error:
            if waitCursor:
                state.app.restoreOverrideCursor()
            if show and not state.app.testing:
                util.errorDisplay(f"{message}\n\n{error}" if message is not None else str(error))
            raise
        if waitCursor:
            state.app.restoreOverrideCursor()

    def pip_install(requirements: Any) -> None:
        record("pip_install", list(requirements) if not isinstance(requirements, str) else requirements)
        if state.pipFails:
            raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install"])

    def delayDisplay(message: str, autoCloseMsec: int = 1000, parent: Any = None, **kwargs: Any) -> None:
        record("delayDisplay", message)

    util.confirmOkCancelDisplay = confirmOkCancelDisplay
    util.errorDisplay = display("errorDisplay")
    util.infoDisplay = display("infoDisplay")
    util.warningDisplay = display("warningDisplay")
    util.tryWithErrorDisplay = tryWithErrorDisplay
    util.pip_install = pip_install
    util.delayDisplay = delayDisplay
    util.loadUI = ui_loader.load_ui
    util.childWidgetVariables = ui_loader.child_widget_variables
    util.startupEnvironment = lambda: dict(os.environ)
    util.mainWindow = lambda: None
    return util


def _make_packaging(state: StandInSlicer) -> types.ModuleType:
    packaging = types.ModuleType("slicer.packaging")

    def pip_ensure(requirements: Any, constraints: Any = None, skip_packages: Any = None, prompt_install: bool = True,
                   prompt_restart: bool = True, requester: Optional[str] = None, skip_in_testing: bool = True,
                   show_progress: bool = True) -> None:
        constraintsText = Path(constraints).read_text(encoding="utf-8") if constraints else None
        state.calls.append(("pip_ensure", {"requirements": list(requirements), "constraints": constraintsText,
                                           "prompt_install": prompt_install, "requester": requester,
                                           "skip_in_testing": skip_in_testing}))
        if skip_in_testing and state.app.testing:
            return
        if state.pipFails:
            raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install"])

    packaging.pip_ensure = pip_ensure
    return packaging


def install(monkeypatch: Any, line: str, root: Path, testing: bool = False) -> StandInSlicer:
    """Make the Slicer modules importable as Slicer ``line`` provides them; MRML is slicer-core's own."""
    if line not in LINES:
        raise ValueError(f"line must be one of {LINES}")
    import slicer  # slicer-core: MRML classes, a copy of slicer.util
    import slicer.util as real_util

    home, temporary = root / "Slicer", root / "tmp"
    (home / "bin").mkdir(parents=True, exist_ok=True)
    temporary.mkdir(parents=True, exist_ok=True)
    app = App(home, temporary, testing)
    scene = slicer.vtkMRMLScene()
    state = StandInSlicer(line, app, types.ModuleType("slicer.util"), scene)
    from UNet3DSegmentLib.mrml.headless import startHeadlessApplication

    state.application = startHeadlessApplication(scene)
    state.util = util = _make_util(real_util, state)

    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    scripted.__all__ = [n for n in vars(scripted_module) if n.startswith("ScriptedLoadable")]
    scripted.__dict__.update({n: getattr(scripted_module, n) for n in scripted.__all__})
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = parameter_node.parameterNodeWrapper
    wrapper.WithinRange = parameter_node.WithinRange

    modules = {"qt": qt_standin, "ctk": ctk_standin, "slicer.util": util, "slicer.i18n": i18n,
               "slicer.ScriptedLoadableModule": scripted, "slicer.parameterNodeWrapper": wrapper}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    modulesNamespace = types.SimpleNamespace(**{  # slicer.modules.<name>.logic(), as loaded modules offer
        name.lower(): types.SimpleNamespace(logic=lambda name=name: state.application.moduleLogic(name))
        for name in state.application.moduleLogics})
    for name, value in {"app": app, "mrmlScene": scene, "util": util, "i18n": i18n, "modules": modulesNamespace,
                        "qMRMLWidget": mrml_widgets.qMRMLWidget,
                        "qMRMLNodeComboBox": mrml_widgets.qMRMLNodeComboBox}.items():
        monkeypatch.setattr(slicer, name, value, raising=False)
    if line == "5.12":
        packaging = _make_packaging(state)
        monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
        monkeypatch.setattr(slicer, "packaging", packaging, raising=False)
    else:  # 5.8 and 5.10 ship no slicer/packaging.py
        monkeypatch.delitem(sys.modules, "slicer.packaging", raising=False)
        monkeypatch.delattr(slicer, "packaging", raising=False)
    qt_standin.reset()
    signals.SLOT_ERRORS.clear()
    return state


def add_torch_extension(monkeypatch: Any, state: StandInSlicer, accept: bool = True) -> list:
    """The SlicerPyTorch extension's ``PyTorchUtils`` module; returns the list of its install calls."""
    calls: list = []

    class PyTorchUtilsLogic:
        @staticmethod
        def torchInstalled() -> bool:
            return False

        def installTorch(self, askConfirmation: bool = False, forceComputationBackend: Any = None,
                         torchVersionRequirement: Any = None, torchvisionVersionRequirement: Any = None) -> Any:
            calls.append({"askConfirmation": askConfirmation, "torchVersionRequirement": torchVersionRequirement})
            return types.SimpleNamespace(__version__="2.5.1+cu121") if accept else None

    module = types.ModuleType("PyTorchUtils")
    module.PyTorchUtilsLogic = PyTorchUtilsLogic
    monkeypatch.setitem(sys.modules, "PyTorchUtils", module)
    state.torchExtension = module
    return calls
