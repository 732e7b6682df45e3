"""Where a bundle comes from: a directory, a registry URI or an object-store URL.

Serve, batch and monitor open bundles through :func:`resolve_bundle_source`, which sits
above both :mod:`manymodels.storage` (object stores) and :mod:`manymodels.registry`
(MLflow), so neither of those has to reach up to the other.
"""

from __future__ import annotations

import os
from pathlib import Path

from manymodels.errors import BundleError
from manymodels.registry import resolve_bundle
from manymodels.storage import fetch_bundle, is_remote

__all__ = ["resolve_bundle_source"]


def resolve_bundle_source(source: str | os.PathLike[str]) -> Path:
    """A local bundle directory from a path, a registry URI (``models:/name@alias``)
    or an object-store URL (``s3://bucket/bundles/oj``), for serve and batch alike."""
    text = os.fspath(source)
    if text.startswith("models:/"):
        return Path(resolve_bundle(text))
    if is_remote(text):
        return fetch_bundle(text)
    path = Path(text)
    if not path.is_dir():
        raise BundleError(f"bundle directory {path} does not exist; pass a directory made by "
                          f"`manymodels package`, a registry URI models:/<name>@<alias> or "
                          f"an s3:// URL")
    return path
