"""Bundled example data (no downloads) and a synthetic generator for tests."""

from ._pbmc68k import pbmc68k
from ._synthetic import synthetic

__all__ = ["pbmc68k", "synthetic"]
