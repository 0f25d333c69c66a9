"""Command line layer: ``unet3d-segment`` and its sub-commands (one module per command)."""
