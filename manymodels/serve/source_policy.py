"""Which bundle sources an admin may deploy on a running server.

``POST /admin/deployments`` makes the server open whatever source it is given, so an
unrestricted source is a way to make the server fetch any URL (a cloud metadata
service, an internal host: server-side request forgery) or read any directory. A source
must be one of: a ``models:/`` URI (resolved in the configured registry), a directory
under an allowed root, or a URL under an allowed object-store prefix. The allowed roots
are ``bundle_roots`` plus the directories holding the local bundles served at start-up;
the allowed prefixes are ``bundle_buckets`` plus the buckets of the remote bundles
served at start-up. Everything else is refused before anything is opened or fetched.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import SourceRefused

__all__ = ["MAX_SOURCE_CHARS", "OBJECT_STORES", "SourcePolicy"]

#: Longest source accepted (a path or URL; longer ones are refused, not resolved).
MAX_SOURCE_CHARS = 1024
#: fsspec protocols of the object stores a bundle may come from.
OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def _scheme(source: str) -> str | None:
    scheme, sep, _ = source.partition("://")
    return scheme.lower() if sep else None


def _bucket_prefix(url: str) -> str:
    """``s3://bucket/`` of ``s3://bucket/bundles/oj``."""
    scheme, _, rest = url.partition("://")
    return f"{scheme.lower()}://{rest.split('/', 1)[0]}/"


@dataclass(frozen=True)
class SourcePolicy:
    """Allowed local roots (resolved directories) and object-store URL prefixes."""

    roots: tuple[Path, ...]
    prefixes: tuple[str, ...]

    @classmethod
    def build(cls, roots: Iterable[str], prefixes: Iterable[str],
              served: Iterable[str]) -> SourcePolicy:
        """The policy of ``roots`` and ``prefixes`` (settings) and the ``served`` sources."""
        local = [Path(r).expanduser().resolve() for r in roots]
        remote = [p if p.endswith("/") else p + "/" for p in prefixes]
        for source in served:
            scheme = _scheme(source)
            if scheme is None and not source.startswith("models:"):
                local.append(Path(source).expanduser().resolve().parent)
            elif scheme in OBJECT_STORES:
                remote.append(_bucket_prefix(source))
        return cls(tuple(dict.fromkeys(local)), tuple(dict.fromkeys(remote)))

    def check(self, source: str) -> None:
        """Raise :class:`SourceRefused` (422) unless ``source`` may be deployed."""
        if len(source) > MAX_SOURCE_CHARS:
            raise SourceRefused(f"the bundle source is {len(source)} characters long; at most "
                                f"{MAX_SOURCE_CHARS} are accepted")
        if not source.isprintable() or not source.strip():
            raise SourceRefused("the bundle source must be printable text (a path, a "
                                "models:/ URI or an object-store URL)")
        if source.startswith("models:/"):
            return
        scheme = _scheme(source)
        if scheme is not None and ":" in scheme:  # fsspec chains (simplecache::http://)
            raise SourceRefused(self._rule("URLs of other kinds are not"))
        if scheme is not None:
            if scheme in OBJECT_STORES and any(source.startswith(p) for p in self.prefixes):
                return
            raise SourceRefused(self._rule(f"'{scheme}://' URLs outside the allowed prefixes "
                                           f"are not"))
        if ":" in source.split("/", 1)[0]:  # fsspec chains (simplecache::...) and the like
            raise SourceRefused(self._rule("URLs of other kinds are not"))
        path = Path(source).expanduser()
        if not path.is_absolute():
            raise SourceRefused(self._rule("relative paths are not"))
        resolved = path.resolve()
        if not any(resolved == root or resolved.is_relative_to(root) for root in self.roots):
            raise SourceRefused(self._rule("this directory is not"))
        if not os.path.isdir(resolved):
            raise SourceRefused(f"bundle directory {source} does not exist")

    def _rule(self, what: str) -> str:
        roots = ", ".join(map(str, self.roots)) or "none"
        prefixes = ", ".join(self.prefixes) or "none"
        return (f"a deployment's bundle must be a models:/ URI of the server's registry, a "
                f"directory under the bundle roots ({roots}) or a URL under the bundle "
                f"buckets ({prefixes}); {what}. Allow more with the bundle_roots and "
                f"bundle_buckets settings (MANYMODELS_BUNDLE_ROOTS, "
                f"MANYMODELS_BUNDLE_BUCKETS)")
