"""The package version (one home: the package root and the run records read it)."""

__version__ = "0.1.0"
