"""Object storage: bundles and batch files at ``s3://...`` (any fsspec URL), and where
a bundle source (path, ``models:/`` URI or URL) becomes a local bundle directory.

A fleet of replicas or batch workers on several machines needs one place to read the
same bundle from. Object stores have neither directories nor an atomic rename, so:

- a bundle is uploaded file by file with ``manifest.json`` **last** (and the old manifest
  deleted first when it is replaced): a reader that finds a manifest finds every file
  it names. Beside it ``SHA256SUMS`` lists the size and sha256 of every file, the
  manifest included, and is uploaded just before it;
- a reader downloads into a local cache folder keyed by the sha256 of ``SHA256SUMS``
  (so of every byte of the bundle), checks every file against it, and renames the
  folder into place only then: a cached bundle is always whole and verified, and the
  next start finds it without downloading again;
- write-once objects (batch commit markers) are created with a conditional put
  (``If-None-Match: *``, fsspec's exclusive-create mode ``"xb"``): of two writers, one
  wins and the other learns it lost.

The store is reached with fsspec (``pip install 'manymodels[s3]'`` brings s3fs); the
endpoint and credentials come from the usual AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``...), so nothing here is specific to one provider.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from manymodels.errors import BundleError, SpecError
from manymodels.runtime import sha256_file

__all__ = [
    "SUMS_FILE",
    "bundle_cache_dir",
    "cache_root",
    "fetch_bundle",
    "filesystem",
    "is_remote",
    "mirror_inputs",
    "put_exclusive",
    "upload_bundle",
]

SUMS_FILE = "SHA256SUMS"
MANIFEST = "manifest.json"
CACHE_ENV = "MANYMODELS_CACHE_DIR"


def is_remote(source: str | os.PathLike[str]) -> bool:
    """True for a URL with a scheme other than ``file`` (``s3://``, ``gs://``, ``memory://``)."""
    text = os.fspath(source)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme not in ("file", "models")


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path inside it (no leading scheme).

    A missing driver (s3fs for ``s3://``) becomes one line saying what to install.
    """
    try:
        # fsspec only for object-store URLs
        from fsspec.core import url_to_fs
    except ImportError as exc:  # pragma: no cover - dask brings fsspec
        raise SpecError("object storage needs fsspec: pip install 'manymodels[s3]'") from exc
    try:
        fs, path = url_to_fs(url)
    except (ImportError, ValueError) as exc:
        scheme = url.partition("://")[0]
        raise SpecError(f"cannot open {url}: no driver for {scheme}:// ({exc}); for S3: "
                        f"pip install 'manymodels[s3]'") from exc
    return fs, str(path).rstrip("/")


def put_exclusive(fs: Any, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; ``False`` if it already did.

    On S3 this is one conditional PUT (``If-None-Match: *``): the store decides, so two
    writers racing for the same name cannot both win.
    """
    try:
        with fs.open(path, "xb") as handle:
            handle.write(data)
    except FileExistsError:
        return False
    return True


# -- bundles: upload ----------------------------------------------------------------------
def _local_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.name != SUMS_FILE and "__pycache__" not in p.parts)


def upload_bundle(root: str | os.PathLike[str], url: str, overwrite: bool = False) -> str:
    """Upload the bundle directory ``root`` to ``url``, manifest last; returns the digest.

    An existing bundle at ``url`` is refused unless ``overwrite``; it is then withdrawn
    first (its manifest deleted), so a reader sees the old bundle, none, or the new one.
    """
    root = Path(root)
    if not (root / MANIFEST).is_file():
        raise BundleError(f"{root} is not a bundle directory (no {MANIFEST})")
    fs, base = filesystem(url)
    if fs.exists(f"{base}/{MANIFEST}"):
        if not overwrite:
            raise BundleError(f"{url} already holds a bundle; pass --overwrite to replace it")
        fs.rm(f"{base}/{MANIFEST}")
    files = _local_files(root)
    sums = {rel: {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}
            for rel in files}
    for rel in files:
        if rel != MANIFEST:
            fs.put_file(str(root / rel), f"{base}/{rel}")
    text = json.dumps({"files": sums}, indent=1, sort_keys=True).encode()
    fs.pipe_file(f"{base}/{SUMS_FILE}", text)
    fs.put_file(str(root / MANIFEST), f"{base}/{MANIFEST}")  # the commit point
    return hashlib.sha256(text).hexdigest()


# -- bundles: download into the cache -----------------------------------------------------
def cache_root() -> Path:
    """Where downloads are kept: ``MANYMODELS_CACHE_DIR`` or ``~/.cache/manymodels``
    (registry versions, object-store bundles and batch inputs, each in a subfolder)."""
    explicit = os.environ.get(CACHE_ENV)
    return Path(explicit) if explicit else Path.home() / ".cache" / "manymodels"


def bundle_cache_dir() -> Path:
    """Where object-store bundles are kept, one folder per content digest."""
    return cache_root() / "objects"


def _read_sums(fs: Any, base: str, url: str) -> tuple[bytes, dict[str, dict[str, Any]]]:
    try:
        fs.invalidate_cache()
        if not fs.exists(f"{base}/{MANIFEST}"):
            raise BundleError(f"no bundle at {url}: {MANIFEST} is missing (not uploaded, or "
                              f"an upload is still running)")
        text = fs.cat_file(f"{base}/{SUMS_FILE}")
    except FileNotFoundError as exc:
        raise BundleError(f"{url} has a {MANIFEST} but no {SUMS_FILE}: upload it with "
                          f"`manymodels package --out {url}`") from exc
    except OSError as exc:
        raise BundleError(f"cannot read the bundle at {url}: {exc}") from exc
    try:
        files = dict(json.loads(text)["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{url}/{SUMS_FILE} is corrupt: {exc}") from exc
    return bytes(text), files


def _download_verified(fs: Any, base: str, url: str, files: dict[str, dict[str, Any]],
                       into: Path) -> None:
    for rel, want in files.items():
        target = into / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise BundleError(f"{url}/{SUMS_FILE} names a file outside the bundle: {rel}")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fs.get_file(f"{base}/{rel}", str(target))
        except FileNotFoundError as exc:
            raise BundleError(f"the bundle at {url} is missing {rel} (replaced while being "
                              f"read? try again)") from exc
        have = sha256_file(target)
        if have != want.get("sha256"):
            raise BundleError(f"{rel} of the bundle at {url} does not match its checksum "
                              f"(sha256 {have[:12]}..., expected {str(want.get('sha256'))[:12]}"
                              f"...): the upload was replaced or corrupted; try again")


def fetch_bundle(url: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """The local, verified copy of the bundle at ``url`` (downloaded once per content).

    The cache folder is named by the sha256 of the bundle's ``SHA256SUMS``; a download
    goes to a temporary folder beside it, is checked file by file, and renamed into
    place, so concurrent starts (several replicas on one host) never see half a copy.
    """
    fs, base = filesystem(url)
    text, files = _read_sums(fs, base, url)
    if MANIFEST not in files:
        raise BundleError(f"{url}/{SUMS_FILE} does not list {MANIFEST}")
    digest = hashlib.sha256(text).hexdigest()
    root = Path(cache) if cache is not None else bundle_cache_dir()
    final = root / digest
    if (final / MANIFEST).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=root))
    try:
        _download_verified(fs, base, url, files, tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process renamed the same content first
            if not (final / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# -- batch inputs --------------------------------------------------------------------------
def mirror_inputs(url: str, into: Path, suffixes: tuple[str, ...]) -> Path:
    """Download the input files under ``url`` into ``into`` (the same relative layout,
    so hive ``key=value`` folders and file names in the output stay those of the store);
    files whose size and ETag are unchanged since the last download are kept.

    Returns the local path to plan from (a file for a single-object ``url``).
    """
    fs, base = filesystem(url)
    fs.invalidate_cache()
    try:
        info = fs.info(base)
    except FileNotFoundError as exc:
        raise SpecError(f"input {url} does not exist") from exc
    into.mkdir(parents=True, exist_ok=True)
    state_path = into / ".mirror.json"
    try:
        seen: dict[str, str] = json.loads(state_path.read_text())
    except (OSError, ValueError):
        seen = {}
    if info.get("type") == "file":
        entries = {Path(base).name: info}
        result = into / Path(base).name
    else:
        entries = {}
        for path, item in _walk_files(fs, base):
            rel = path[len(base):].lstrip("/")
            if rel.lower().endswith(suffixes):
                entries[rel] = item
        result = into
    for rel, item in entries.items():
        stamp = f"{item.get('size')}:{item.get('ETag') or item.get('etag') or ''}"
        target = into / rel
        if seen.get(rel) == stamp and target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        fs.get_file(item["name"], str(part))
        os.replace(part, target)
        seen[rel] = stamp
    for rel in set(seen) - set(entries):  # gone from the store: gone from the plan too
        (into / rel).unlink(missing_ok=True)
        seen.pop(rel)
    state_path.write_text(json.dumps(seen))
    return result


def _walk_files(fs: Any, base: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, item in sorted(fs.find(base, detail=True).items()):
        if item.get("type") == "file":
            yield str(path), item
