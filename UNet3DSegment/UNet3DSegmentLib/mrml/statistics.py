"""Volume of each segment of a segmentation node, in millilitres, for the panel's result table.

Counted on each segment's binary labelmap as Slicer stores it (shared labelmaps included: a segment
is the voxels holding its label value), times the voxel volume of that labelmap's grid. Empty
segments count 0 mL. Runs on slicer-core, so it is tested headless.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import vtk
from vtk.util.numpy_support import vtk_to_numpy

LABELMAP = "Binary labelmap"
CUBIC_MM_PER_ML = 1000.0


@dataclass(frozen=True)
class SegmentVolume:
    """One row of the table: segment name, colour (0-1 RGB), voxel count and volume in mL."""

    segmentId: str
    name: str
    color: tuple[float, float, float]
    voxels: int
    millilitres: float

    @property
    def colorHex(self) -> str:
        return "#" + "".join(f"{round(c * 255):02x}" for c in self.color)


def segmentVolumes(segmentationNode) -> list[SegmentVolume]:
    """Every segment of ``segmentationNode`` in order, with its volume; raises nothing for empty ones."""
    segmentation = segmentationNode.GetSegmentation()
    rows = []
    for index in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segmentId)
        voxels, voxelVolume = _countVoxels(segment)
        rows.append(SegmentVolume(segmentId, segment.GetName(), tuple(segment.GetColor()), voxels,
                                  voxels * voxelVolume / CUBIC_MM_PER_ML))
    return rows


def _countVoxels(segment) -> tuple[int, float]:
    """Voxels of ``segment`` in its binary labelmap and the volume of one voxel in mm^3."""
    labelmap = segment.GetRepresentation(LABELMAP)
    if labelmap is None or labelmap.GetPointData().GetScalars() is None:
        return 0, 0.0
    extent = labelmap.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return 0, 0.0
    values = vtk_to_numpy(labelmap.GetPointData().GetScalars())
    voxels = int(np.count_nonzero(values == segment.GetLabelValue()))
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    axes = np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])
    return voxels, float(abs(np.linalg.det(axes)))
