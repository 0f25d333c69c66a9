"""Stand-in for Slicer's ``qt`` module (PythonQt): the widgets, timer and dialogs the module file uses.

Widgets keep their Qt properties as Python attributes (``label.text = ...``, ``button.enabled``) as
PythonQt exposes them, and emit the signals Qt emits when a value changes (``setValue`` ->
``valueChanged``), so that the parameter-node stand-in and the module's own slots are driven as in
Slicer. Nothing here draws; tests read what a user would see from the attributes.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from .signals import SignalSource


class Qt:
    WaitCursor = 16
    ArrowCursor = 0
    AlignLeft = 1
    ItemIsEnabled = 32


class QObject(SignalSource):
    def __init__(self, parent: Optional["QObject"] = None) -> None:
        SignalSource.__init__(self)
        self.objectName = ""
        self._parent = None
        self._children: list[QObject] = []
        self._properties: dict[str, Any] = {}
        if parent is not None:
            self.setParent(parent)

    def setParent(self, parent: Optional["QObject"]) -> None:
        if self._parent is not None:
            self._parent._children.remove(self)
        self._parent = parent
        if parent is not None:
            parent._children.append(self)

    def parent(self) -> Optional["QObject"]:
        return self._parent

    @property
    def name(self) -> str:  # PythonQt alias of objectName
        return self.objectName

    def property(self, name: str) -> Any:
        return self._properties.get(name)

    def setProperty(self, name: str, value: Any) -> None:
        self._properties[name] = value

    def findChildren(self, cls: type = None) -> list["QObject"]:
        found = []
        for child in self._children:
            if cls is None or isinstance(child, cls):
                found.append(child)
            found.extend(child.findChildren(cls))
        return found

    def isWidgetType(self) -> bool:
        return False


class QLayout:
    def __init__(self) -> None:
        self.widgets: list[QWidget] = []

    def addWidget(self, widget: "QWidget", *args: Any) -> None:
        self.widgets.append(widget)

    def addStretch(self, *args: Any) -> None:
        pass


class QWidget(QObject):
    def __init__(self, parent: Optional[QObject] = None) -> None:
        QObject.__init__(self, parent)
        self.enabled = True
        self.visible = True
        self.toolTip = ""
        self._layout = QLayout()

    def isWidgetType(self) -> bool:
        return True

    def layout(self) -> QLayout:
        return self._layout

    def setEnabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)

    def setVisible(self, visible: bool) -> None:
        self.visible = bool(visible)

    def isEnabled(self) -> bool:
        """Enabled itself and every parent enabled, as Qt computes it."""
        widget: Optional[QObject] = self
        while widget is not None:
            if isinstance(widget, QWidget) and not widget.enabled:
                return False
            widget = widget.parent()
        return True


class QLabel(QWidget):
    def __init__(self, parent: Optional[QObject] = None) -> None:
        QWidget.__init__(self, parent)
        self.text = ""
        self.wordWrap = False
        self.textInteractionFlags = 0
        self.openExternalLinks = False


class QAbstractButton(QWidget):
    def __init__(self, parent: Optional[QObject] = None) -> None:
        QWidget.__init__(self, parent)
        self.text = ""
        self.checkable = False
        self._checked = False

    @property
    def checked(self) -> bool:
        return self._checked

    @checked.setter
    def checked(self, value: bool) -> None:
        value = bool(value)
        if value != self._checked:
            self._checked = value
            if isinstance(self, QCheckBox):
                self.emit("stateChanged", 2 if value else 0)  # Qt emits it before toggled
            self.emit("toggled", value)

    def click(self) -> None:
        """A user's click: does nothing on a disabled button (or one inside a disabled parent)."""
        if not self.isEnabled():
            return
        if self.checkable:
            self.checked = not self.checked
        self.emit("clicked", self.checked)


class QPushButton(QAbstractButton):
    pass


class QToolButton(QAbstractButton):
    pass


class QCheckBox(QAbstractButton):
    def __init__(self, parent: Optional[QObject] = None) -> None:
        QAbstractButton.__init__(self, parent)
        self.checkable = True


class QLineEdit(QWidget):
    def __init__(self, parent: Optional[QObject] = None) -> None:
        QWidget.__init__(self, parent)
        self._text = ""
        self.placeholderText = ""
        self.clearButtonEnabled = False

    @property
    def text(self) -> str:
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        if value != self._text:
            self._text = str(value)
            self.emit("textChanged", self._text)

    def userTypes(self, text: str) -> None:
        """What typing ``text`` and leaving the field does."""
        self.text = text
        self.emit("editingFinished")


class QPlainTextEdit(QWidget):
    def __init__(self, parent: Optional[QObject] = None) -> None:
        QWidget.__init__(self, parent)
        self.plainText = ""
        self.readOnly = False
        self.maximumBlockCount = 0

    def appendPlainText(self, text: str) -> None:
        self.plainText = f"{self.plainText}\n{text}" if self.plainText else str(text)
        if self.maximumBlockCount:
            self.plainText = "\n".join(self.plainText.split("\n")[-self.maximumBlockCount:])

    def clear(self) -> None:
        self.plainText = ""

    def toPlainText(self) -> str:
        return self.plainText


class QProgressBar(QWidget):
    def __init__(self, parent: Optional[QObject] = None) -> None:
        QWidget.__init__(self, parent)
        self.value = 0
        self.format = "%p%"
        self.minimum = 0
        self.maximum = 100


class _Ranged(QWidget):
    def __init__(self, parent: Optional[QObject] = None) -> None:
        QWidget.__init__(self, parent)
        self.minimum = 0
        self.maximum = 99
        self.singleStep = 1
        self._value = 0

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value) -> None:
        value = min(max(value, self.minimum), self.maximum)  # Qt clamps to the range
        if value != self._value:
            self._value = value
            self.emit("valueChanged", value)


class QSpinBox(_Ranged):
    pass


class QDoubleSpinBox(_Ranged):
    """Qt's double spin box: ``specialValueText`` is shown in place of the minimum (Qt's own rule)."""

    def __init__(self, parent: Optional[QObject] = None) -> None:
        _Ranged.__init__(self, parent)
        self.decimals = 2
        self.specialValueText = ""
        self._value = 0.0

    @property
    def text(self) -> str:
        if self.specialValueText and self._value == self.minimum:
            return self.specialValueText
        return f"{self._value:.{self.decimals}f}"


class QSlider(_Ranged):
    pass


class QComboBox(QWidget):
    def __init__(self, parent: Optional[QObject] = None) -> None:
        QWidget.__init__(self, parent)
        self._items: list[tuple[str, Any]] = []
        self._index = -1

    def addItem(self, text: str, data: Any = None) -> None:
        self._items.append((str(text), data))
        if self._index < 0:
            self.currentIndex = 0

    def clear(self) -> None:
        self._items.clear()
        self.currentIndex = -1

    @property
    def count(self) -> int:
        return len(self._items)

    def itemText(self, index: int) -> str:
        return self._items[index][0]

    def itemData(self, index: int) -> Any:
        return self._items[index][1]

    @property
    def currentIndex(self) -> int:
        return self._index

    @currentIndex.setter
    def currentIndex(self, index: int) -> None:
        index = int(index) if -1 <= int(index) < len(self._items) else -1
        if index != self._index:
            self._index = index
            self.emit("currentIndexChanged", index)

    @property
    def currentText(self) -> str:
        return self._items[self._index][0] if self._index >= 0 else ""

    def userSelects(self, text: str) -> None:
        """A user's choice of the item showing ``text``."""
        texts = [t for t, _ in self._items]
        if text not in texts:
            raise AssertionError(f"{self.objectName} offers {texts}, not {text!r}")
        self.currentIndex = texts.index(text)


class QTableWidget(QWidget):
    """Cells as text; tests read ``cells()``."""

    def __init__(self, parent: Optional[QObject] = None) -> None:
        QWidget.__init__(self, parent)
        self.rowCount = 0
        self.columnCount = 0
        self.editTriggers = 0
        self._headers: list[str] = []
        self._cells: dict[tuple[int, int], "QTableWidgetItem"] = {}

    def setRowCount(self, rows: int) -> None:
        self.rowCount = int(rows)
        self._cells = {k: v for k, v in self._cells.items() if k[0] < rows}

    def setColumnCount(self, columns: int) -> None:
        self.columnCount = int(columns)

    def setHorizontalHeaderLabels(self, labels: list) -> None:
        self._headers = [str(label) for label in labels]

    def setItem(self, row: int, column: int, item: "QTableWidgetItem") -> None:
        if not (0 <= row < self.rowCount and 0 <= column < self.columnCount):
            raise IndexError(f"cell ({row}, {column}) outside a {self.rowCount}x{self.columnCount} table")
        self._cells[(row, column)] = item

    def item(self, row: int, column: int) -> Optional["QTableWidgetItem"]:
        return self._cells.get((row, column))

    def resizeColumnsToContents(self) -> None:
        pass

    def headers(self) -> list[str]:
        return list(self._headers)

    def cells(self) -> list[list[str]]:
        return [[self._cells[(r, c)].text() if (r, c) in self._cells else "" for c in range(self.columnCount)]
                for r in range(self.rowCount)]


class QColor:
    def __init__(self, *rgb: Any) -> None:
        if len(rgb) == 1 and isinstance(rgb[0], str):
            text = rgb[0].lstrip("#")
            rgb = tuple(int(text[i:i + 2], 16) for i in (0, 2, 4))
        self.rgb = tuple(int(v) for v in rgb[:3])

    def name(self) -> str:
        return "#" + "".join(f"{v:02x}" for v in self.rgb)


class QTableWidgetItem:
    def __init__(self, text: str = "") -> None:
        self._text = str(text)
        self.background: Optional[QColor] = None
        self.toolTip = ""
        self.flags = 0

    def text(self) -> str:
        return self._text

    def setBackground(self, color: QColor) -> None:
        self.background = color

    def setToolTip(self, text: str) -> None:
        self.toolTip = text

    def setFlags(self, flags: int) -> None:
        self.flags = flags

    def setTextAlignment(self, alignment: int) -> None:
        pass


class QTimer(QObject):
    """Fires only when the test drives it (``fire()`` or ``drive_timers``): no hidden event loop."""

    ACTIVE: list["QTimer"] = []
    SINGLE_SHOTS: list[tuple[int, Callable[[], None]]] = []

    def __init__(self, parent: Optional[QObject] = None) -> None:
        QObject.__init__(self, parent)
        self.interval = 0
        self.singleShot_ = False

    def setInterval(self, msec: int) -> None:
        self.interval = int(msec)

    def setSingleShot(self, single: bool) -> None:
        self.singleShot_ = bool(single)

    def start(self, msec: Optional[int] = None) -> None:
        if msec is not None:
            self.interval = int(msec)
        if self not in QTimer.ACTIVE:
            QTimer.ACTIVE.append(self)

    def stop(self) -> None:
        if self in QTimer.ACTIVE:
            QTimer.ACTIVE.remove(self)

    def isActive(self) -> bool:
        return self in QTimer.ACTIVE

    def fire(self) -> None:
        if self.singleShot_:
            self.stop()
        self.emit("timeout")

    @staticmethod
    def singleShot(msec: int, callback: Callable[[], None]) -> None:
        QTimer.SINGLE_SHOTS.append((int(msec), callback))


def drive_timers(until: Callable[[], bool], timeout: float = 30.0, step: float = 0.02) -> None:
    """Run the event loop as Slicer would: fire due single shots and active timers until ``until()``."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout} s")
        shots, QTimer.SINGLE_SHOTS[:] = list(QTimer.SINGLE_SHOTS), []
        for _, callback in shots:
            callback()
        for timer in list(QTimer.ACTIVE):
            timer.fire()
        time.sleep(step)


class QFileDialog:
    """``getOpenFileName`` returns the next path queued in ``ANSWERS`` ("" when the user cancels)."""

    ANSWERS: list[str] = []
    CALLS: list[tuple] = []

    @staticmethod
    def getOpenFileName(*args: Any) -> str:
        QFileDialog.CALLS.append(args)
        return QFileDialog.ANSWERS.pop(0) if QFileDialog.ANSWERS else ""


class QMessageBox:
    Ok = 0x400
    Cancel = 0x400000
    Yes = 0x4000
    No = 0x10000


def reset() -> None:
    """Forget timers and dialog answers between tests."""
    QTimer.ACTIVE.clear()
    QTimer.SINGLE_SHOTS.clear()
    QFileDialog.ANSWERS.clear()
    QFileDialog.CALLS.clear()
