"""The library's version: one place, read by the package root, the files it writes and the build (pyproject)."""

__version__ = "0.2.0"
