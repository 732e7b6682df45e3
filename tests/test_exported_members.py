"""The public API is ``manymodels.__all__``: every name resolves, nothing private leaks."""

from __future__ import annotations

import manymodels
from manymodels.errors import ManyModelsError


def test_every_exported_name_resolves() -> None:
    """Check that each name in __all__ is importable, including the lazy train entry point."""
    for name in manymodels.__all__:
        assert getattr(manymodels, name) is not None, name
    assert callable(manymodels.train)
    assert not [n for n in manymodels.__all__ if n.startswith("_") and n != "__version__"]


def test_every_error_subclasses_the_base_and_a_builtin() -> None:
    """Check that each exported error is a ManyModelsError and a built-in exception type."""
    errors = [getattr(manymodels, n) for n in manymodels.__all__ if n.endswith(("Error", "Found"))]
    assert len(errors) >= 12
    for cls in errors:
        assert issubclass(cls, ManyModelsError)
        assert cls is ManyModelsError or any(
            base in cls.__mro__ for base in (ValueError, KeyError, RuntimeError))
