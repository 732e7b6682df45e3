"""Tests of manymodels.credentials: the key file, key checks and JWT verification."""

from __future__ import annotations

import base64
import json
import stat
import threading
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from typer.testing import CliRunner

from manymodels.cli import app
from manymodels.credentials import (
    KeyFile,
    KeyVerifier,
    Principal,
    TokenVerifier,
    create_token,
    expand_scopes,
    parse_ttl,
    write_token_secret,
)
from manymodels.errors import AuthError, SpecError

SECRET = b"s" * 64


def test_admin_implies_the_others_but_score_implies_nothing_else() -> None:
    """Check the scope implications and that an unknown scope is refused by name."""
    assert expand_scopes(["admin"]) == {"admin", "read", "score", "batch"}
    assert expand_scopes(["score"]) == {"score"}
    assert expand_scopes(["batch"]) == {"batch"}
    assert expand_scopes(["read", "score"]) == {"read", "score"}
    with pytest.raises(SpecError, match="unknown scope 'write'"):
        expand_scopes(["write"])


def test_key_file_stores_hashes_only_with_mode_0600(tmp_path: Path) -> None:
    """Check that a created key is nowhere in the file, which is 0600 and lists the hash."""
    store = KeyFile(tmp_path / "conf" / "keys.json")
    record, key = store.create("app1", ["score"])
    text = store.path.read_text()
    secret = key.split("_", 2)[2]  # mmk_<hex id>_<secret>; the secret may hold "_" itself
    assert key not in text and secret not in text
    assert record.sha256 in text and record.id in key
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert [p.name for p in store.path.parent.iterdir() if p.name.endswith(".tmp")] == []
    assert store.records()[0].public() == {k: v for k, v in json.loads(text)["keys"][0].items()
                                           if k != "sha256"}


def test_two_active_keys_per_name_for_rotation(tmp_path: Path) -> None:
    """Check primary/secondary rotation: a third active key is refused until one is revoked."""
    store = KeyFile(tmp_path / "keys.json")
    first, _ = store.create("app1", ["score"])
    store.create("app1", ["score"])
    with pytest.raises(SpecError, match="already has 2 active keys"):
        store.create("app1", ["score"])
    assert [r.id for r in store.revoke(first.id)] == [first.id]
    store.create("app1", ["score"])
    assert sum(r.active for r in store.records()) == 2 and len(store.records()) == 3
    with pytest.raises(SpecError, match="no active key with id or name 'nobody'"):
        store.revoke("nobody")
    assert len(store.revoke("app1")) == 2


@pytest.mark.parametrize("name, scopes, rate, match", [
    ("bad name!", ["score"], None, "key name"),
    ("app", [], None, "at least one scope"),
    ("app", ["owner"], None, "unknown scope"),
    ("app", ["score"], 0.0, "rate limit"),
])
def test_key_create_checks_its_arguments(tmp_path: Path, name: str, scopes: list[str],
                                         rate: float | None, match: str) -> None:
    """Check that each bad argument of KeyFile.create is refused with a message naming it."""
    with pytest.raises(SpecError, match=match):
        KeyFile(tmp_path / "keys.json").create(name, scopes, rate_limit=rate)


def test_concurrent_creates_lose_no_key(tmp_path: Path) -> None:
    """Check that eight simultaneous creates (each its own lock handle) keep all eight keys."""
    store = KeyFile(tmp_path / "keys.json")
    threads = [threading.Thread(target=store.create, args=(f"app{i}", ["score"]))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.name for r in store.records()) == [f"app{i}" for i in range(8)]


def test_key_verifier_accepts_reloads_and_forgets_revoked(tmp_path: Path) -> None:
    """Check that the verifier accepts a key, rejects a wrong one and sees a revocation."""
    store = KeyFile(tmp_path / "keys.json")
    record, key = store.create("app1", ["read"], rate_limit=5)
    verifier = KeyVerifier(store.path, reload_seconds=0)
    principal = verifier.verify(key, time.time())
    assert principal == Principal(subject=f"app1/{record.id}", scopes=frozenset({"read"}),
                                  rate_limit=5)
    for wrong in (key[:-1] + ("A" if key[-1] != "A" else "B"), "mmk_nothing", "", key + "x"):
        with pytest.raises(AuthError, match="unknown or revoked"):
            verifier.verify(wrong, time.time())
    store.revoke(record.id)
    with pytest.raises(AuthError):
        verifier.verify(key, time.time())
    _, second = store.create("app2", ["score"])
    assert verifier.verify(second, time.time()).scopes == {"score"}


def test_key_verifier_keeps_last_good_keys_on_a_corrupt_file(tmp_path: Path) -> None:
    """Check that a half-edited key file keeps the keys already loaded (and logs why)."""
    store = KeyFile(tmp_path / "keys.json")
    _, key = store.create("app1", ["score"])
    verifier = KeyVerifier(store.path, reload_seconds=0)
    store.path.write_text("{not json")
    assert verifier.verify(key, time.time()).subject.startswith("app1/")


# -- tokens --------------------------------------------------------------------------------
def _verifier(**kw: object) -> TokenVerifier:
    return TokenVerifier(key=SECRET, algorithms=["HS256"], leeway=0, **kw)  # type: ignore[arg-type]


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_token_round_trip_and_claims() -> None:
    """Check that a created token verifies with its scopes, subject and expiry."""
    now = time.time()
    token = create_token(["score", "read"], 3600, subject="app1", key=SECRET, now=now)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="manymodels")
    assert {"exp", "iat", "aud", "sub", "scope", "jti"} <= set(claims)
    assert claims["exp"] - claims["iat"] == 3600
    principal = _verifier().verify(token, now)
    assert principal.scopes == {"score", "read"} and principal.subject == "token:app1"
    assert principal.expires == int(now + 3600)


def _bad_tokens() -> dict[str, tuple[str, str]]:
    now = time.time()
    good = create_token(["score"], 600, subject="a", key=SECRET)
    head, body, sig = good.split(".")
    claims = {"sub": "a", "aud": "manymodels", "scope": "admin", "iat": int(now),
              "exp": int(now + 600)}
    return {
        "expired": (create_token(["score"], 60, subject="a", key=SECRET, now=now - 3600),
                    "expired"),
        "not yet valid": (create_token(["score"], 600, subject="a", key=SECRET,
                                       not_before=now + 600), "not valid yet"),
        "wrong audience": (create_token(["score"], 600, subject="a", key=SECRET,
                                        audience="other"), "audience"),
        "tampered": (f"{head}.{_b64(claims)}.{sig}", "signature"),
        "alg none": (f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}.", "algorithm"),
        "other algorithm": (jwt.encode(claims, SECRET, algorithm="HS512"), "algorithm"),
        "other secret": (create_token(["score"], 600, subject="a", key=b"t" * 64), "signature"),
        "no exp": (jwt.encode({k: v for k, v in claims.items() if k != "exp"}, SECRET,
                              algorithm="HS256"), "required claim"),
        "no scope": (jwt.encode({k: v for k, v in claims.items() if k != "scope"}, SECRET,
                                algorithm="HS256"), "required claim"),
        "garbage": ("abc.def", "well-formed"),
    }


@pytest.mark.parametrize("label", list(_bad_tokens()))
def test_bad_tokens_are_refused_with_a_reason_not_the_token(label: str) -> None:
    """Check that each kind of bad token raises AuthError naming the problem, not the token."""
    token, reason = _bad_tokens()[label]
    with pytest.raises(AuthError, match=reason) as caught:
        _verifier().verify(token, time.time())
    assert token not in str(caught.value)


def test_public_keys_verify_rs256_and_es256_and_refuse_hs256_confusion(tmp_path: Path) -> None:
    """Check RS256 / ES256 tokens from another issuer, and that HS256 signed with the public
    key (the classic algorithm confusion) is refused."""
    import hashlib
    import hmac

    for private, algorithm in ((rsa.generate_private_key(65537, 2048), "RS256"),
                               (ec.generate_private_key(ec.SECP256R1()), "ES256")):
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        (tmp_path / f"{algorithm}.pub").write_bytes(public)
        verifier = TokenVerifier.from_files(None, tmp_path / f"{algorithm}.pub")
        assert verifier.algorithms == [algorithm]
        token = create_token(["admin"], 60, subject="issuer", key=pem, algorithm=algorithm)
        assert verifier.verify(token, time.time()).scopes == {"admin", "read", "score", "batch"}
        header = _b64({"alg": "HS256", "typ": "JWT"})
        body = _b64({"sub": "x", "aud": "manymodels", "scope": "admin", "iat": int(time.time()),
                     "exp": int(time.time()) + 60})
        mac = hmac.new(public, f"{header}.{body}".encode(), hashlib.sha256).digest()
        forged = f"{header}.{body}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
        with pytest.raises(AuthError, match="algorithm"):
            verifier.verify(forged, time.time())
    with pytest.raises(SpecError, match="not a readable PEM"):
        TokenVerifier.from_files(None, tmp_path / "missing.pub")
    with pytest.raises(SpecError, match="token_secret_file"):
        TokenVerifier.from_files(None, None)


def test_verified_tokens_are_cached_until_expiry_and_bounded() -> None:
    """Check that a verified token is decoded once, re-checked after its expiry, and that
    the cache never holds more than its size."""
    verifier = _verifier(cache_size=4)
    decoded: list[str] = []
    real = verifier._decode

    def counting(token: str) -> Principal:
        decoded.append(token)
        return real(token)

    verifier._decode = counting  # type: ignore[method-assign]
    now = time.time()
    token = create_token(["score"], 30, subject="a", key=SECRET, now=now)
    for _ in range(5):
        verifier.verify(token, now)
    assert len(decoded) == 1
    verifier.verify(token, now + 60)  # past its exp: not served from the cache
    assert len(decoded) == 2
    for i in range(10):
        verifier.verify(create_token(["score"], 30, subject=f"s{i}", key=SECRET), time.time())
        assert len(verifier._cache) <= 4


def test_parse_ttl() -> None:
    """Check the TTL units and the message for a bad one."""
    assert [parse_ttl(t) for t in ("45", "30s", "15m", "1h", "2d", "1.5h")] == \
        [45, 30, 900, 3600, 172800, 5400]
    for bad in ("0", "-1h", "1w", "soon"):
        with pytest.raises(SpecError, match="ttl"):
            parse_ttl(bad)


def test_token_secret_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    """Check that the HS256 secret is made 0600 and never overwritten."""
    path = tmp_path / "secret"
    write_token_secret(path)
    first = path.read_bytes()
    write_token_secret(path)
    assert path.read_bytes() == first and len(first.strip()) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# -- CLI -----------------------------------------------------------------------------------
def test_cli_keys_create_list_revoke(tmp_path: Path) -> None:
    """Check `manymodels keys create|list|revoke`: the key alone on stdout, never listed."""
    keys = str(tmp_path / "keys.json")
    runner = CliRunner()
    made = runner.invoke(app, ["keys", "create", "--name", "app1", "--scope", "score,read",
                               "--key-file", keys])
    assert made.exit_code == 0, made.output
    key = made.stdout.strip()
    assert key.startswith("mmk_") and len(key.splitlines()) == 1
    key_id = key.split("_")[1]
    listed = runner.invoke(app, ["keys", "list", "--key-file", keys])
    assert key_id in listed.stdout and key not in listed.stdout and "read,score" in listed.stdout
    revoked = runner.invoke(app, ["keys", "revoke", key_id, "--key-file", keys])
    assert revoked.exit_code == 0 and key_id in revoked.output
    assert key_id not in runner.invoke(app, ["keys", "list", "--key-file", keys]).stdout
    assert key_id in runner.invoke(app, ["keys", "list", "--all", "--key-file", keys]).stdout
    bad = runner.invoke(app, ["keys", "create", "--name", "x", "--scope", "root",
                              "--key-file", keys])
    assert bad.exit_code != 0


def test_cli_token_create_hs256_and_rs256(tmp_path: Path) -> None:
    """Check `manymodels token create`: HS256 with a secret it creates, RS256 with a PEM key."""
    runner = CliRunner()
    secret = tmp_path / "secret"
    made = runner.invoke(app, ["token", "create", "--scope", "score", "--ttl", "15m",
                               "--subject", "app1", "--secret-file", str(secret)])
    assert made.exit_code == 0, made.output
    token = made.stdout.strip()
    claims = jwt.decode(token, secret.read_bytes().strip(), algorithms=["HS256"],
                        audience="manymodels")
    assert claims["scope"] == "score" and claims["sub"] == "app1"
    assert claims["exp"] - claims["iat"] == 900
    private = rsa.generate_private_key(65537, 2048)
    pem = tmp_path / "issuer.pem"
    pem.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    signed = runner.invoke(app, ["token", "create", "--scope", "admin", "--private-key-file",
                                 str(pem)])
    assert signed.exit_code == 0, signed.output
    assert jwt.get_unverified_header(signed.stdout.strip())["alg"] == "RS256"
    jwt.decode(signed.stdout.strip(), private.public_key(), algorithms=["RS256"],
               audience="manymodels")
