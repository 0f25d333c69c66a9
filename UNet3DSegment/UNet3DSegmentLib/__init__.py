"""UNet3DSegment engine: Keras 3D U-Net segmentation of medical volumes, free of Slicer.

Importing this package is cheap: TensorFlow is loaded only where a model is built or loaded.
Modules whose name starts with ``mrml`` need Slicer's MRML (desktop Slicer or slicer-core).
"""

__version__ = "0.1.0"
