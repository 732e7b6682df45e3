"""``manymodels image``: one OCI image per bundle, built without a container daemon.

The image runs ``manymodels serve`` on the bundle at ``/bundle``, configured by
``MANYMODELS_*`` variables, and holds only what serving needs (the bundle's pinned
requirements and the web stack, never the training libraries). buildah builds it from a
Debian root filesystem made by mmdebstrap, or from an image pulled from a registry;
podman runs it. See ``docs/guide/image.md``.
"""

from __future__ import annotations

from ._build import (
    BUNDLE_DIR,
    PORT,
    ImageResult,
    build_image,
    bundle_digest,
    image_labels,
    image_size,
    parse_tag,
    push_image,
)
from ._requirements import SERVE_PACKAGES, TRAINING_LIBRARIES, build_wheel, serving_requirements
from ._run import podman_run_command, remove_container, run_image
from ._tools import Storage

__all__ = [
    "BUNDLE_DIR",
    "PORT",
    "SERVE_PACKAGES",
    "TRAINING_LIBRARIES",
    "ImageResult",
    "Storage",
    "build_image",
    "build_wheel",
    "bundle_digest",
    "image_labels",
    "image_size",
    "parse_tag",
    "podman_run_command",
    "push_image",
    "remove_container",
    "run_image",
    "serving_requirements",
]
