"""Stand-ins for Slicer's MRML widgets (``slicer.qMRMLWidget``, ``slicer.qMRMLNodeComboBox``) on a real scene."""

from __future__ import annotations

from typing import Any, Optional

from .qt import QObject, QWidget


class qMRMLWidget(QWidget):
    """Root of a module panel: ``setMRMLScene`` emits ``mrmlSceneChanged`` (the ``.ui`` wires selectors to it)."""

    def __init__(self, parent: Optional[QObject] = None) -> None:
        QWidget.__init__(self, parent)
        self._scene = None
        self.isEntered = False

    def setMRMLScene(self, scene: Any) -> None:
        self._scene = scene
        self.emit("mrmlSceneChanged", scene)

    def mrmlScene(self) -> Any:
        return self._scene


class qMRMLNodeComboBox(QWidget):
    """Node selector on a real MRML scene: nodes of ``nodeTypes``, "None" when ``noneEnabled``.

    As the real one: without ``noneEnabled`` the first node is selected once there is one; ``addNode``
    creates a node of the first type (Slicer's "Create new ..." entry, offered when ``addEnabled``).
    """

    def __init__(self, parent: Optional[QObject] = None) -> None:
        QWidget.__init__(self, parent)
        self.nodeTypes: list[str] = []
        self.noneEnabled = False
        self.addEnabled = False
        self.removeEnabled = False
        self.renameEnabled = False
        self.editEnabled = False
        self.showChildNodeTypes = True
        self.showHidden = False
        self.noneDisplay = "None"
        self.baseName = ""
        self.selectNodeUponCreation = True
        self._scene = None
        self._current = None

    # --- scene -----------------------------------------------------------------------------------
    def setMRMLScene(self, scene: Any) -> None:
        self._scene = scene
        self._selectDefault()

    def mrmlScene(self) -> Any:
        return self._scene

    def nodes(self) -> list:
        """The nodes the user can pick, in scene order."""
        if self._scene is None:
            return []
        found = []
        for index in range(self._scene.GetNumberOfNodes()):
            node = self._scene.GetNthNode(index)
            if any(node.IsA(t) for t in self.nodeTypes) and (self.showHidden or not node.GetHideFromEditors()):
                if self.showChildNodeTypes or node.GetClassName() in self.nodeTypes:
                    found.append(node)
        return found

    def _selectDefault(self) -> None:
        if self.currentNode() is None and not self.noneEnabled:
            nodes = self.nodes()
            if nodes:
                self.setCurrentNode(nodes[0])

    # --- selection -------------------------------------------------------------------------------
    def currentNode(self) -> Any:
        """The selected node; a node removed from the scene is no longer shown (read lazily: no observer)."""
        if self._current is not None and self._current.GetScene() is not self._scene:
            self._current = None
        return self._current

    @property
    def currentNodeID(self) -> str:
        return self._current.GetID() if self._current is not None else ""

    def setCurrentNode(self, node: Any) -> None:
        if node is not None and node not in self.nodes():
            raise AssertionError(f"{self.objectName} cannot show {node.GetName()}: not a {self.nodeTypes} in its scene")
        if node is None and not self.noneEnabled and self.nodes():
            raise AssertionError(f"{self.objectName} has no 'None' entry")
        if node is not self._current:
            self._current = node
            self.emit("currentNodeChanged", node)
            self.emit("currentNodeIDChanged", self.currentNodeID)

    def setCurrentNodeID(self, nodeID: str) -> None:
        self.setCurrentNode(self._scene.GetNodeByID(nodeID) if nodeID else None)

    def userSelects(self, node: Any) -> None:
        """A user's pick in the drop-down (``None``: the "None"/``noneDisplay`` entry)."""
        if node is None and not self.noneEnabled:
            raise AssertionError(f"{self.objectName} offers no {self.noneDisplay!r} entry")
        self.setCurrentNode(node)

    def addNode(self, nodeType: Optional[str] = None) -> Any:
        """What "Create new ..." does: a new node of the first type, added to the scene and selected."""
        className = nodeType or self.nodeTypes[0]
        node = self._scene.AddNewNodeByClass(className, self._scene.GenerateUniqueName(self.baseName or className))
        self.emit("nodeAddedByUser", node)
        if self.selectNodeUponCreation:
            self.setCurrentNode(node)
        return node


from .qt import QPushButton  # noqa: E402


class qMRMLSegmentationShow3DButton(QPushButton):
    """Slicer's "Show 3D" button: checked when the segmentation has closed surfaces; toggling builds/removes them."""

    CLOSED_SURFACE = "Closed surface"

    def __init__(self, parent: Optional[QObject] = None) -> None:
        QPushButton.__init__(self, parent)
        self.checkable = True
        self._node = None
        self.connect("toggled(bool)", self._onToggled)

    def setSegmentationNode(self, node: Any) -> None:
        self._node = node
        segmentation = node.GetSegmentation() if node is not None else None
        # As Slicer's: enabled only for a segmentation with segments whose source is not a closed surface
        self.enabled = bool(segmentation is not None and segmentation.GetNumberOfSegments() > 0
                            and segmentation.GetSourceRepresentationName() != self.CLOSED_SURFACE)
        present = node is not None and node.GetSegmentation().ContainsRepresentation(self.CLOSED_SURFACE)
        self.blockSignals(True)
        self.checked = present
        self.blockSignals(False)

    def segmentationNode(self) -> Any:
        return self._node

    def _onToggled(self, on: bool) -> None:
        if self._node is None:
            return
        if on:
            self._node.CreateClosedSurfaceRepresentation()
        else:
            self._node.RemoveClosedSurfaceRepresentation()
