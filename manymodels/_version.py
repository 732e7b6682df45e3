"""The package version, read once from the installed distribution's metadata.

pyproject.toml is the one place the version is written; everything that reports it
(``manymodels --version``, manifests, ONNX producer, the server) imports it from here.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("manymodels")
except PackageNotFoundError:  # a source tree on PYTHONPATH that was never installed
    __version__ = "0+unknown"
