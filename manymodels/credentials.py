"""Credentials of the endpoint: API keys (a key file of hashes) and expiring JWTs.

Two kinds, as Azure ML endpoints have them: **keys** never expire and are rotated by
hand (two active per name, primary and secondary), **tokens** expire and can be issued
by another service. Both resolve to one :class:`Principal`: who is calling, with which
scopes, until when. The server's middleware (:mod:`manymodels.serve.auth`) only ever
sees principals; this module imports no web framework, so the CLI can manage keys and
tokens without loading the server.

Scopes: ``read`` (list models, stats, metrics, docs), ``score`` (the scoring routes) and
``admin`` (load / unload models, deployments). ``admin`` implies the other two, as an
administrator's key on Azure ML can also score; ``score`` does not imply ``read``, so an
application's key can score but not enumerate the bundle's models.

Keys look like ``mmk_<id>_<secret>``: the id is public (it names the key in ``keys
list``, logs and rate limits), the secret is 256 random bits. The key file stores the
SHA-256 of each key, never the key: a fast hash is enough for 256-bit secrets (there is
nothing to brute-force), and verifying costs about a microsecond per request. Hashes are
compared with :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from manymodels.errors import AuthError, SpecError
from manymodels.io import atomic_write_text

__all__ = [
    "SCOPES",
    "KeyFile",
    "KeyRecord",
    "KeyVerifier",
    "Principal",
    "TokenVerifier",
    "create_token",
    "default_key_file",
    "default_token_secret_file",
    "expand_scopes",
    "parse_ttl",
    "read_token_secret",
    "write_token_secret",
]

log = logging.getLogger("manymodels.serve")

#: Every scope, from the weakest; ``admin`` implies the others. ``batch`` starts, watches
#: and cancels batch jobs (``/batch/jobs``).
SCOPES = ("read", "score", "batch", "admin")
IMPLIED = {"admin": frozenset(SCOPES), "batch": frozenset({"batch"}),
           "score": frozenset({"score"}), "read": frozenset({"read"})}
ACTIVE_PER_NAME = 2
KEY_PREFIX = "mmk_"
AUDIENCE = "manymodels"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def expand_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """The scopes ``scopes`` grant, implications included; unknown names are a SpecError."""
    out: set[str] = set()
    for scope in scopes:
        if scope not in IMPLIED:
            raise SpecError(f"unknown scope '{scope}'; scopes are {', '.join(SCOPES)} "
                            f"(admin implies the others)")
        out |= IMPLIED[scope]
    return frozenset(out)


def _config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "manymodels"


def default_key_file() -> Path:
    """Where keys live unless told otherwise: ``$XDG_CONFIG_HOME/manymodels/keys.json``."""
    return _config_dir() / "keys.json"


def default_token_secret_file() -> Path:
    """The HS256 signing secret's default place, beside the key file."""
    return _config_dir() / "token-secret"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified credential speaks for.

    ``subject`` is public (a key's ``name/id`` or a token's ``sub``): it appears in logs
    and is the unit of the rate limit. ``expires`` is a Unix time, ``None`` for keys.
    """

    subject: str
    scopes: frozenset[str]
    expires: float | None = None
    rate_limit: float | None = None

    @property
    def is_authenticated(self) -> bool:  # Starlette's ``scope["user"]`` protocol
        return True

    @property
    def display_name(self) -> str:
        return self.subject


# -- keys ----------------------------------------------------------------------------------
@dataclass(slots=True)
class KeyRecord:
    """One line of the key file: everything about a key except the key."""

    id: str
    name: str
    scopes: list[str]
    sha256: str
    created: str
    revoked: str | None = None
    rate_limit: float | None = None
    """Requests per second for this key (``None``: the server's ``auth.rate_limit``)."""

    @property
    def active(self) -> bool:
        return self.revoked is None

    def public(self) -> dict[str, Any]:
        """The record without its hash, for ``keys list``."""
        out = asdict(self)
        del out["sha256"]
        return out


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _now_text() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class KeyFile:
    """The key file: JSON with one :class:`KeyRecord` per key, mode 0600.

    Every change happens under an exclusive lock on ``<file>.lock`` and is written
    atomically (temporary file created 0600, fsync, rename), so two ``keys create`` at
    once never lose a key and a running server never reads half a file.
    """

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    def records(self) -> list[KeyRecord]:
        """Every key, revoked ones included (an absent file holds none)."""
        return parse_key_file(self.path)

    def create(self, name: str, scopes: Sequence[str],
               rate_limit: float | None = None) -> tuple[KeyRecord, str]:
        """A new key for ``name``; returns its record and the key (shown only once)."""
        if not _NAME_RE.match(name):
            raise SpecError(f"key name '{name}' must be 1-64 letters, digits, '.', '_' or '-'")
        if not scopes:
            raise SpecError(f"give key '{name}' at least one scope ({', '.join(SCOPES)})")
        expand_scopes(scopes)
        if rate_limit is not None and rate_limit <= 0:
            raise SpecError(f"rate limit of key '{name}' must be > 0 requests/s, not {rate_limit}")
        with self._locked():
            records = self.records()
            active = [r for r in records if r.name == name and r.active]
            if len(active) >= ACTIVE_PER_NAME:
                raise SpecError(f"'{name}' already has {len(active)} active keys "
                                f"({', '.join(r.id for r in active)}); revoke one with "
                                f"`manymodels keys revoke ID` before creating another")
            taken = {r.id for r in records}
            key_id = secrets.token_hex(6)
            while key_id in taken:
                key_id = secrets.token_hex(6)
            key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
            record = KeyRecord(id=key_id, name=name, scopes=sorted(set(scopes)),
                               sha256=_hash_key(key), created=_now_text(), rate_limit=rate_limit)
            self._write([*records, record])
        return record, key

    def revoke(self, target: str) -> list[KeyRecord]:
        """Revoke the key with id ``target``, or every active key of the name ``target``."""
        with self._locked():
            records = self.records()
            hit = [r for r in records if r.active and target in (r.id, r.name)]
            if not hit:
                known = ", ".join(sorted({f"{r.name} ({r.id})" for r in records if r.active}))
                raise SpecError(f"no active key with id or name '{target}' in {self.path}"
                                f"{'; active: ' + known if known else ' (it holds no active key)'}")
            stamp = _now_text()
            for record in hit:
                record.revoked = stamp
            self._write(records)
        return hit

    def _write(self, records: list[KeyRecord]) -> None:
        document = {"format": 1, "keys": [asdict(r) for r in records]}
        atomic_write_text(self.path, json.dumps(document, indent=2) + "\n", mode=0o600)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


_ID_RE = re.compile(r"^[0-9a-f]{12}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def parse_key_file(path: Path) -> list[KeyRecord]:
    """The records of the key file ``path`` (none if it does not exist), every one
    checked: a single bad record makes the whole file a :class:`SpecError` naming it."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"key file {path} cannot be read ({exc}); create keys with "
                        f"`manymodels keys create`") from None
    try:
        document = json.loads(text)
        items = document["keys"]
        if not isinstance(items, list):
            raise TypeError("'keys' is not a list")
    except (ValueError, KeyError, TypeError) as exc:
        raise SpecError(f"key file {path} is not a manymodels key file ({exc}); "
                        f"create keys with `manymodels keys create`") from None
    records = []
    for i, item in enumerate(items):
        problem = _record_problem(item)
        if problem is not None:
            named = item.get("id") if isinstance(item, dict) else None
            which = f"record {i}" + (f" (id {named})" if isinstance(named, str)
                                     and _ID_RE.match(named) else "")
            raise SpecError(f"key file {path}: {which} {problem}; fix or remove it "
                            f"(`manymodels keys revoke` and `keys create` rewrite the file)")
        records.append(KeyRecord(**item))
    return records


def _record_problem(item: Any) -> str | None:
    """What is wrong with one key-file record (never quoting its hash), or ``None``."""
    if not isinstance(item, dict):
        return f"is a {type(item).__name__}, not an object"
    known = {f.name for f in KeyRecord.__dataclass_fields__.values()}
    unknown = sorted(set(item) - known)
    if unknown:
        return f"has unknown field(s) {', '.join(unknown)}"
    missing = sorted({"id", "name", "scopes", "sha256", "created"} - set(item))
    if missing:
        return f"lacks {', '.join(missing)}"
    if not isinstance(item["id"], str) or not _ID_RE.match(item["id"]):
        return "has an id that is not 12 hexadecimal digits"
    if not isinstance(item["name"], str) or not _NAME_RE.match(item["name"]):
        return "has a name that is not 1-64 letters, digits, '.', '_' or '-'"
    scopes = item["scopes"]
    if not isinstance(scopes, list) or not scopes or not all(
            isinstance(x, str) and x in IMPLIED for x in scopes):
        return f"has scopes that are not a non-empty list of {', '.join(SCOPES)}"
    if not isinstance(item["sha256"], str) or not _SHA256_RE.match(item["sha256"]):
        return "has a sha256 that is not 64 lowercase hexadecimal digits"
    if not isinstance(item["created"], str) or not (
            item.get("revoked") is None or isinstance(item["revoked"], str)):
        return "has a 'created' or 'revoked' that is not a time stamp"
    rate = item.get("rate_limit")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float)
                             or not rate > 0 or not math.isfinite(rate)):
        return "has a rate_limit that is not a number > 0"
    return None


class KeyVerifier:
    """The server's view of the key file, re-read when the file changes.

    The file is stat'ed at most once per ``reload_seconds`` (a ``stat`` call is cheap
    next to a request), so a key revoked by ``manymodels keys revoke``
    stops working on a running server within that time, without a restart or a signal.
    A file that becomes unreadable or corrupt keeps the last good keys and logs why.
    """

    def __init__(self, path: Path, reload_seconds: float = 1.0) -> None:
        self.path = Path(path)
        self.reload_seconds = reload_seconds
        self._signature: tuple[int, int, int] | None = None
        self._refused: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._by_id: dict[bytes, tuple[bytes, Principal]] = {}
        self._seen: dict[bytes, bytes] = {}  # key id -> the key last verified under it
        self._dummy = hashlib.sha256(b"mmk_" + b"0" * 12 + b"_" + b"0" * 43).digest()
        self._swap(parse_key_file(self.path), self._stat())  # a bad file: refuse to start

    @property
    def active_keys(self) -> int:
        return len(self._by_id)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return None
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("key file %s can be read by other users (mode %o); "
                        "chmod 600 it", self.path, stat.S_IMODE(info.st_mode))
        return (info.st_ino, info.st_mtime_ns, info.st_size)

    def _swap(self, records: list[KeyRecord], signature: tuple[int, int, int] | None) -> None:
        """Make ``records`` (checked whole by :func:`parse_key_file`) the keys in use."""
        self._by_id = {r.id.encode(): (bytes.fromhex(r.sha256),
                                       Principal(subject=f"{r.name}/{r.id}",
                                                 scopes=expand_scopes(r.scopes),
                                                 rate_limit=r.rate_limit))
                       for r in records if r.active}
        self._seen = {}
        self._signature = signature
        self._refused = None
        log.info("key file %s: %d active keys", self.path, len(self._by_id))

    def reload(self, force: bool = False) -> None:
        """Re-read the file if it changed (or always, with ``force``). A file that does
        not check keeps the last good keys and is reported once, in one line."""
        try:
            signature = self._stat()
        except OSError as exc:
            signature = (-1, -1, -1)
            problem: str | None = f"key file {self.path} cannot be read ({exc.strerror})"
        else:
            problem = None
        if not force and (signature == self._signature
                          or self._refused is not None and signature == self._refused):
            return
        if problem is None:
            try:
                self._swap(parse_key_file(self.path), signature)
                return
            except SpecError as exc:
                problem = exc.message
        self._refused = signature
        log.error("%s; keeping the %d keys loaded before", problem, len(self._by_id))

    def verify(self, key: str | bytes, now: float) -> Principal:
        """The principal of ``key``, or :class:`AuthError` (unknown or revoked key)."""
        if now >= self._next_check:
            self._next_check = now + self.reload_seconds
            self.reload()
        raw = key.encode() if isinstance(key, str) else key
        # mmk_<12 hex id>_<43 chars>: the id is sliced, not matched (this runs per request)
        key_id = raw[4:16]
        entry = self._by_id.get(key_id) if len(raw) == 60 and raw[:4] == b"mmk_" else None
        if entry is not None:
            seen = self._seen.get(key_id)
            # the key verified last under this id: a constant-time compare of the bytes
            # replaces the SHA-256, the costliest step of the check on the hot path
            if seen is not None and hmac.compare_digest(seen, raw):
                return entry[1]
        # compare even when the id is unknown, so timing does not tell ids apart
        same = hmac.compare_digest(hashlib.sha256(raw).digest(),
                                   entry[0] if entry else self._dummy)
        if same and entry is not None:
            self._seen[key_id] = raw
            return entry[1]
        raise AuthError("the API key is unknown or revoked")


# -- tokens --------------------------------------------------------------------------------
_TTL_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_TTL_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> float:
    """Seconds in ``30s``, ``15m``, ``1h``, ``7d`` or a plain number of seconds."""
    match = _TTL_RE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise SpecError(f"ttl '{text}' must be a positive duration such as 30s, 15m, 1h or 7d")
    return float(match.group(1)) * _TTL_UNIT[match.group(2)]


def write_token_secret(path: Path) -> None:
    """Create a 256-bit HS256 signing secret at ``path`` (mode 0600) if there is none."""
    if not path.exists():
        atomic_write_text(path, secrets.token_urlsafe(48) + "\n", mode=0o600)


def read_token_secret(path: Path) -> bytes:
    """The HS256 secret stored at ``path`` (surrounding whitespace stripped)."""
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise SpecError(f"token secret {path} cannot be read ({exc.strerror}); create one "
                        f"with `manymodels token create` or point auth.token_secret_file "
                        f"at it") from None
    if len(secret) < 32:
        raise SpecError(f"token secret {path} is {len(secret)} bytes; HS256 needs at least 32")
    return secret


def create_token(scopes: Sequence[str], ttl_seconds: float, *, subject: str,
                 key: bytes | str, algorithm: str = "HS256", audience: str = AUDIENCE,
                 issuer: str | None = None, not_before: float | None = None,
                 now: float | None = None) -> str:
    """A signed JWT with ``exp``, ``iat``, ``aud``, ``sub`` and a space-separated ``scope``.

    ``key`` is the HS256 secret, or a PEM private key for RS256 / ES256.
    """
    # PyJWT only in token mode
    import jwt

    expand_scopes(scopes)
    issued = time.time() if now is None else now
    claims: dict[str, Any] = {"sub": subject, "aud": audience, "scope": " ".join(scopes),
                              "iat": int(issued), "exp": int(issued + ttl_seconds),
                              "jti": secrets.token_hex(8)}
    if issuer is not None:
        claims["iss"] = issuer
    if not_before is not None:
        claims["nbf"] = int(not_before)
    return jwt.encode(claims, key, algorithm=algorithm)


#: Algorithms a public key of each type verifies; HS256 for a shared secret.
_ALGORITHMS_BY_KEY = {"RSA": ["RS256"], "EC": ["ES256"]}


@dataclass
class TokenVerifier:
    """Verifies JWTs against the server's secret (HS256) or a public key (RS256/ES256).

    Only the algorithms of the configured key are accepted, so ``alg: none`` and the
    HS256-with-the-public-key confusion both fail; ``exp``, ``iat``, ``aud`` and
    ``scope`` are required. A verified token is cached by its text until it expires
    (at most ``cache_size`` of them), so the hot path verifies each signature once.
    """

    key: Any
    algorithms: list[str]
    audience: str = AUDIENCE
    issuer: str | None = None
    leeway: float = 10.0
    cache_size: int = 10_000
    _cache: dict[bytes, Principal] = field(default_factory=dict, repr=False)

    @classmethod
    def from_files(cls, secret_file: Path | None, public_key_file: Path | None,
                   **options: Any) -> TokenVerifier:
        """A verifier for the HS256 secret in ``secret_file`` or the PEM public key."""
        if public_key_file is not None:
            # cryptography only for RS256/ES256 keys
            from cryptography.hazmat.primitives.asymmetric import ec, rsa
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            try:
                public = load_pem_public_key(Path(public_key_file).read_bytes())
            except (OSError, ValueError) as exc:
                raise SpecError(f"token public key {public_key_file} is not a readable PEM "
                                f"public key ({exc})") from None
            kind = "RSA" if isinstance(public, rsa.RSAPublicKey) else (
                "EC" if isinstance(public, ec.EllipticCurvePublicKey) else None)
            if kind is None:
                raise SpecError(f"token public key {public_key_file} must be RSA (RS256) or "
                                f"EC P-256 (ES256)")
            return cls(key=public, algorithms=_ALGORITHMS_BY_KEY[kind], **options)
        if secret_file is None:
            raise SpecError("auth mode 'token' needs auth.token_secret_file (HS256) or "
                            "auth.token_public_key_file (RS256/ES256)")
        return cls(key=read_token_secret(Path(secret_file)), algorithms=["HS256"], **options)

    def verify(self, token: str | bytes, now: float) -> Principal:
        """The principal of ``token``, or :class:`AuthError` saying what is wrong."""
        if isinstance(token, str):
            token = token.encode()
        hit = self._cache.get(token)
        if hit is not None:
            if hit.expires is not None and now < hit.expires + self.leeway:
                return hit
            del self._cache[token]
        principal = self._decode(token)
        if len(self._cache) >= self.cache_size:
            self._evict(now)
        self._cache[token] = principal
        return principal

    def _evict(self, now: float) -> None:
        """Drop expired entries; if the cache is still full, drop the oldest half."""
        for token in [t for t, p in self._cache.items()
                      if p.expires is None or p.expires + self.leeway <= now]:
            del self._cache[token]
        if len(self._cache) >= self.cache_size:
            for token in list(self._cache)[: max(1, len(self._cache) // 2)]:
                del self._cache[token]

    def _decode(self, token: bytes) -> Principal:
        # PyJWT only in token mode
        import jwt

        try:
            claims = jwt.decode(token, self.key, algorithms=self.algorithms,
                                audience=self.audience, issuer=self.issuer, leeway=self.leeway,
                                options={"require": ["exp", "iat", "aud", "scope"]})
        except jwt.PyJWTError as exc:
            raise AuthError(f"the token is not accepted: {_token_problem(exc)}") from None
        scope = claims["scope"]
        names = scope.split() if isinstance(scope, str) else scope
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise AuthError("the token is not accepted: its 'scope' claim must be a "
                            "space-separated string")
        granted = frozenset().union(*(IMPLIED.get(n, frozenset()) for n in names))
        subject = claims.get("sub")
        return Principal(subject=f"token:{subject if isinstance(subject, str) else '?'}",
                         scopes=granted, expires=float(claims["exp"]))


def _token_problem(exc: Exception) -> str:
    """A fixed description per PyJWT error: never the token, never its claims' values."""
    # PyJWT only in token mode
    import jwt

    table: list[tuple[type[Exception], str]] = [
        (jwt.ExpiredSignatureError, "it has expired"),
        (jwt.ImmatureSignatureError, "it is not valid yet (nbf or iat in the future)"),
        (jwt.InvalidAudienceError, "wrong audience"),
        (jwt.InvalidIssuerError, "wrong issuer"),
        (jwt.MissingRequiredClaimError, "a required claim (exp, iat, aud, scope) is missing"),
        (jwt.InvalidAlgorithmError, "its signing algorithm is not accepted here"),
        (jwt.InvalidSignatureError, "the signature does not verify"),
        (jwt.DecodeError, "it is not a well-formed signed JWT"),
    ]
    for cls, text in table:
        if isinstance(exc, cls):
            return text
    return "its claims are invalid"
