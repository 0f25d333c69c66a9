"""Slicer-side client without Qt: the engine child process, dependency checks and installation, panel options and texts."""
