"""MRML layer: segmentation of volume nodes into segmentation nodes; needs Slicer's MRML (desktop Slicer or slicer-core)."""
