"""manymodels: one model per segment, trained in parallel, exported to ONNX, served as one."""

from __future__ import annotations

from manymodels.errors import ManyModelsError

__version__ = "0.1.0"

__all__ = ["ManyModelsError", "__version__"]
