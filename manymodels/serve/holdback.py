"""A partial promotion: the new version of a bundle minus the models that failed its
rollout, which keep the live version's files.

The result is a bundle directory like any other (model files hard-linked, the manifest
entries of the held-back models copied from the live bundle, a version of its own) and
is registered as a new version of the same registered model, tagged with the version it
comes from and the models held back, so the registry, every replica and every later
reader see one and the same bundle.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

from manymodels.io import atomic_write_text, link_or_copy
from manymodels.registry import RegisteredBundle, register_bundle, seed_cache, set_version_tags
from manymodels.runtime import MANIFEST_FILE

__all__ = ["HELD_BACK_TAG", "hold_back", "write_held_back"]

#: Version tag listing the models held back (comma-separated), and the source version.
HELD_BACK_TAG = "manymodels.rollout.held_back"
DERIVED_TAG = "manymodels.rollout.derived_from"


def write_held_back(candidate: Path, live: Path, models: list[str], out: Path) -> Path:
    """Write ``candidate`` with the manifest entries and files of ``models`` taken from
    ``live`` to ``out`` (through a temporary directory and a rename)."""
    manifest = json.loads((candidate / MANIFEST_FILE).read_text())
    live_manifest = json.loads((live / MANIFEST_FILE).read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(candidate, tmp, copy_function=link_or_copy)
        digest = hashlib.sha256(str(manifest.get("version")).encode())
        for name in sorted(models):
            entry = live_manifest["models"][name]
            target = tmp / entry["file"]
            if target.exists():
                target.unlink()  # a link to the candidate's file: replaced, never written
            target.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(live / entry["file"], target)
            manifest["models"][name] = entry
            digest.update(f"{name}={entry.get('sha256')}".encode())
        manifest["version"] = f"{manifest.get('version')}-held-{digest.hexdigest()[:8]}"
        atomic_write_text(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def hold_back(model: str, candidate_version: str, candidate: Path, live: Path,
              failing: Mapping[str, str], workdir: Path) -> RegisteredBundle:
    """Register ``candidate`` minus the ``failing`` models (they keep ``live``'s files)
    as a new version of ``model``; the alias is left to the caller."""
    out = write_held_back(candidate, live, sorted(failing),
                          workdir / f"{model}-{candidate_version}-held-{uuid.uuid4().hex[:6]}")
    registered = register_bundle(out, name=model)
    set_version_tags(model, registered.version, {
        DERIVED_TAG: candidate_version, HELD_BACK_TAG: ",".join(sorted(failing))})
    seed_cache(out, model, registered.version)
    return registered
