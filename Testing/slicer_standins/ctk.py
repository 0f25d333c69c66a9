"""Stand-in for Slicer's ``ctk`` module: the CTK widgets our ``.ui`` file uses."""

from __future__ import annotations

from typing import Optional

from .qt import QObject, QWidget, _Ranged


class ctkCollapsibleButton(QWidget):
    def __init__(self, parent: Optional[QObject] = None) -> None:
        QWidget.__init__(self, parent)
        self.text = ""
        self.collapsed = False


class ctkCheckBox(QWidget):
    pass


class ctkSliderWidget(_Ranged):
    """Float slider with spin box; ``decimals`` and ``singleStep`` as in CTK."""

    def __init__(self, parent: Optional[QObject] = None) -> None:
        _Ranged.__init__(self, parent)
        self.decimals = 2
        self._value = 0.0


class ctkPathLineEdit(QWidget):
    """Path field with history; setting ``currentPath`` emits ``currentPathChanged`` as CTK does."""

    Files, Dirs, Drives, Executable, NoDot, NoDotDot, Readable = 2, 1, 4, 8, 0x2000, 0x4000, 0x10
    Open, Save = 0, 1

    def __init__(self, parent: Optional[QObject] = None) -> None:
        QWidget.__init__(self, parent)
        self._path = ""
        self.filters = 0
        self.nameFilters: list[str] = []
        self.settingKey = ""
        self.history: list[str] = []

    @property
    def currentPath(self) -> str:
        return self._path

    @currentPath.setter
    def currentPath(self, path: str) -> None:
        path = str(path)
        if path != self._path:
            self._path = path
            self.emit("currentPathChanged", path)

    def setCurrentPath(self, path: str) -> None:
        self.currentPath = path

    def addCurrentPathToHistory(self) -> None:
        if self._path and self._path not in self.history:
            self.history.insert(0, self._path)
