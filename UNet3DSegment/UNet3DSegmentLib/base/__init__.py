"""Base layer: error kinds and exit codes, every user option declared once, sizes and durations. Imports nothing of the package."""
