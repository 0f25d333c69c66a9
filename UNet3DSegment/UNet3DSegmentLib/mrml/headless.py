"""What Slicer's start-up does for a scene, done on ``slicer-core`` so the logic runs without the application.

In Slicer the application logic, the colour nodes and each module's logic exist before any module
code runs; the Segmentations logic registers the representation converters (binary labelmap, closed
surface) without which no segment can be created. Headless code (scripts, tests, benchmarks) calls
:func:`startHeadlessApplication` once per scene and keeps the returned object alive as long as the scene.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import slicer


@dataclass
class HeadlessApplication:
    """The scene with the application logic and the module logics a segmentation needs."""

    scene: Any
    applicationLogic: Any
    moduleLogics: dict[str, Any] = field(default_factory=dict)

    def moduleLogic(self, name: str) -> Any:
        """``Segmentations``, ``SubjectHierarchy`` or ``Volumes``: what ``slicer.modules.<name>.logic()`` gives."""
        return self.moduleLogics[name]


def startHeadlessApplication(scene: Optional[Any] = None) -> HeadlessApplication:
    """Application logic, default colours and the Segmentations/SubjectHierarchy/Volumes logics on ``scene``
    (a new scene when None), plus one slice composite node as a slice view would have."""
    scene = scene if scene is not None else slicer.vtkMRMLScene()
    applicationLogic = slicer.vtkSlicerApplicationLogic()
    applicationLogic.SetMRMLScene(scene)
    applicationLogic.GetColorLogic().SetMRMLScene(scene)
    applicationLogic.GetColorLogic().AddDefaultColorNodes()
    application = HeadlessApplication(scene, applicationLogic)
    for name, logic in [("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic()),
                        ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic()),
                        ("Volumes", slicer.vtkSlicerVolumesLogic())]:
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(applicationLogic)
        applicationLogic.SetModuleLogic(name, logic)
        application.moduleLogics[name] = logic
    scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    return application
