"""Tests of manymodels.serve.auth over real HTTP and HTTPS: keys, tokens, scopes, limits.

Each server runs as ``manymodels serve`` in its own process, once over plain HTTP and
once over HTTPS with a certificate made here, with debug logging and the access log on;
after its tests, its whole log is searched for every key and token the tests sent.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from builders import build_bundle, self_signed_certificate
from conftest import answering, assert_clean_log

from manymodels.credentials import KeyFile, create_token, write_token_secret
from manymodels.errors import SpecError
from manymodels.io import atomic_write_text
from manymodels.serve import ServeSettings
from manymodels.serve.auth import RateLimiter, auth_mode, is_loopback, required_scope

GLOBAL = "quantity__global"
SCOPES = ("read", "score", "batch", "admin")
GRANTS = {"read": {"read"}, "score": {"score"}, "batch": {"batch"},
          "admin": {"read", "score", "batch", "admin"}}

# The policy, written here a second time on purpose: a route added to the app without a
# decision lands in "read" (default deny), and this table says what each route must need.
# (/ui is the endpoint page's static shell, open like health; its data routes need read)
HEALTH = {"/ping", "/health", "/v2/health/live", "/v2/health/ready", "/ui"}
SCORING = {"/score", "/invocations", "/v2/models/{name}/infer",
           "/v2/models/{name}/versions/{model_version}/infer", "/models/{name}/score",
           "/segments/score", "/forecast"}
# Paths outside the OpenAPI document that must be guarded as well.
EXTRA = [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/ui"),
         ("GET", "/nope"), ("POST", "/admin/nope"), ("GET", "/score/"), ("GET", "/batch/nope"),
         ("POST", "/v2/models/a/b/infer")]


def expected_scope(template: str) -> str | None:
    if template in HEALTH:
        return None
    if template in SCORING:
        return "score"
    if template == "/admin" or template.startswith("/admin/") or (
            template.startswith("/v2/repository/models/")
            and template.endswith(("/load", "/unload"))):
        return "admin"
    if template == "/batch" or template.startswith("/batch/"):
        return "batch"
    return "read"


@dataclass
class Live:
    """One running ``manymodels serve`` and every credential sent to it."""

    url: str
    client: httpx.Client
    log: Path
    creds: dict[str, str]
    key_file: Path | None = None
    sent: list[str] = field(default_factory=list)

    def call(self, method: str, path: str, credential: str | None = None,
             **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if credential is not None:
            self.sent.append(credential)
            headers["Authorization"] = f"Bearer {credential}"
        reply = self.client.request(method, path, headers=headers, **kw)
        for secret in self.sent:  # never echoed back, in a body or a header
            assert secret not in reply.text and secret not in str(reply.headers)
        assert "Traceback" not in reply.text
        return reply


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, _ = build_bundle(tmp_path_factory.mktemp("auth") / "oj", n_stores=2,
                           rows_per_segment=6)
    return root


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


def _client_tls(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


@contextlib.contextmanager
def _serving(bundle: Path, folder: Path, flags: list[str], creds: dict[str, str],
             cert: tuple[Path, Path] | None, key_file: Path | None = None) -> Iterator[Live]:
    """``manymodels serve`` with ``flags``; after it stops, its log must hold no secret."""
    tls = _client_tls(cert[0]) if cert else None
    ssl_flags = ["--ssl-certfile", str(cert[0]), "--ssl-keyfile", str(cert[1])] if cert else []
    log = folder / f"server-{'https' if cert else 'http'}.log"
    command = [sys.executable, "-m", "manymodels", "serve", str(bundle), "--port", "{port}",
               "--log-level", "debug", "--access-log", "plain", *flags, *ssl_flags]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with answering(command, "/ping", "manymodels serve", log=log, tls=tls, env=env) as url, \
            httpx.Client(base_url=url, timeout=30, verify=tls or True) as client:
        live = Live(url, client, log, creds, key_file)
        yield live
    text = log.read_text()
    assert "/score" in text and "401" in text, "the access log was not captured"
    for secret in {*live.sent, *creds.values()}:
        for part in _secret_parts(secret):
            assert part not in text, "a credential reached the server log"
    assert "Traceback" not in text


def _secret_parts(credential: str) -> list[str]:
    """The credential and its secret part alone (a key's secret, a token's signature)."""
    if credential.startswith("mmk_"):
        part = credential.split("_", 2)[-1]
    elif credential.count(".") == 2:
        part = credential.rsplit(".", 1)[-1]
    else:
        part = credential
    return [p for p in (credential, part) if len(p) >= 16]


@pytest.fixture(scope="module")
def key_servers(bundle: Path, certificate: tuple[Path, Path],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Live]]:
    """Two servers with ``--auth key`` (HTTP and HTTPS), a key per scope, one slow key."""
    folder = tmp_path_factory.mktemp("keys")
    store = KeyFile(folder / "keys.json")
    creds = {scope: store.create(f"app-{scope}", [scope])[1] for scope in SCOPES}
    creds["slow"] = store.create("slow", ["score"], rate_limit=0.05)[1]
    flags = ["--auth", "key", "--key-file", str(store.path)]
    with _serving(bundle, folder, flags, creds, None, store.path) as plain, \
            _serving(bundle, folder, flags, creds, certificate, store.path) as secure:
        yield [plain, secure]


@pytest.fixture(scope="module")
def token_servers(bundle: Path, certificate: tuple[Path, Path],
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Live]]:
    """Two servers with ``--auth token`` (HS256; HTTP and HTTPS), a token per scope."""
    folder = tmp_path_factory.mktemp("tokens")
    secret = folder / "token-secret"
    write_token_secret(secret)
    key = secret.read_bytes().strip()
    creds = {scope: create_token([scope], 3600, subject=f"app-{scope}", key=key)
             for scope in SCOPES}
    creds["secret"] = key.decode()
    flags = ["--auth", "token", "--token-secret-file", str(secret)]
    with _serving(bundle, folder, flags, creds, None) as plain, \
            _serving(bundle, folder, flags, creds, certificate) as secure:
        yield [plain, secure]


def _routes(live: Live, admin: str) -> list[tuple[str, str, str]]:
    """(method, template, concrete path) of every OpenAPI operation, plus EXTRA."""
    document = live.call("GET", "/openapi.json", admin).json()
    out = []
    for template, operations in document["paths"].items():
        path = template.replace("{name}", GLOBAL).replace("{model_version}", "1")
        path = re.sub(r"\{[^}]+\}", "x", path)
        out += [(method.upper(), template, path) for method in operations
                if method in ("get", "post", "put", "patch", "delete")]
    assert {t for _, t, _ in out} >= HEALTH | {"/score", "/invocations", "/models"}
    return out + [(m, p, p) for m, p in EXTRA]


def _walk(live: Live) -> int:
    checked = 0
    for method, template, path in _routes(live, live.creds["admin"]):
        needed = expected_scope(template)
        # a body the handlers refuse (400) once past the middleware: the walk must not
        # change the endpoint (an admin PUT of {} traffic would stop all live traffic)
        body = {"content": b"not json", "headers": {"content-type": "application/json"}} \
            if method != "GET" else {}
        bare = live.call(method, path, **body)
        if needed is None:
            assert bare.status_code == 200, (method, path, bare.text)
            continue
        assert bare.status_code == 401, (method, path, bare.status_code)
        assert bare.headers["www-authenticate"].startswith('Bearer realm="manymodels"')
        for held in SCOPES:
            reply = live.call(method, path, live.creds[held], **body)
            if needed in GRANTS[held]:
                assert reply.status_code not in (401, 403), (held, method, path, reply.text)
            else:
                assert reply.status_code == 403, (held, method, path, reply.status_code)
                assert f'scope="{needed}"' in reply.headers["www-authenticate"]
        checked += 1
    return checked


def test_every_route_needs_its_scope_with_keys(key_servers: list[Live]) -> None:
    """Check every OpenAPI route (and unknown ones) over HTTP and HTTPS with keys: 401
    without credentials (health 200), 403 for the wrong scope, admin allowed everywhere."""
    for live in key_servers:
        assert _walk(live) >= 15


def test_every_route_needs_its_scope_with_tokens(token_servers: list[Live]) -> None:
    """Check the same walk with tokens (a score token gets 403 on the admin routes)."""
    for live in token_servers:
        assert live.url.startswith(("http://", "https://"))
        assert _walk(live) >= 15
    assert token_servers[1].url.startswith("https://")


def _score_body() -> dict[str, Any]:
    return {"model": GLOBAL, "data": [{"store": 1, "brand": "tropicana", "price": 1.5,
                                       "feat": 1.0}]}


def _infer_body() -> dict[str, Any]:
    columns = {"store": ("BYTES", "1"), "brand": ("BYTES", "tropicana"), "price": ("FP32", 1.5),
               "feat": ("FP32", 1.0)}
    return {"inputs": [{"name": n, "shape": [1, 1], "datatype": t, "data": [v]}
                       for n, (t, v) in columns.items()]}


def test_fast_lane_scores_only_with_credentials(key_servers: list[Live]) -> None:
    """Check that the raw-ASGI /score and V2 infer answer predictions with a score key only."""
    for live in key_servers:
        for path, body in (("/score", _score_body()), (f"/v2/models/{GLOBAL}/infer",
                                                       _infer_body())):
            assert live.call("POST", path, json=body).status_code == 401
            assert live.call("POST", path, live.creds["read"], json=body).status_code == 403
            scored = live.call("POST", path, live.creds["score"], json=body)
            assert scored.status_code == 200, scored.text
            assert ("predictions" in scored.json()) or ("outputs" in scored.json())
        wrong_scheme = live.call("POST", "/score", json=_score_body(),
                                 headers={"Authorization": f"Basic {live.creds['score']}"})
        live.sent.append(live.creds["score"])
        assert wrong_scheme.status_code == 401


def test_revoked_key_stops_working_on_the_running_server(key_servers: list[Live],
                                                          tmp_path: Path) -> None:
    """Check that `manymodels keys create` / `revoke` take effect on running servers."""
    key_file = str(key_servers[0].key_file)
    cli = [sys.executable, "-m", "manymodels", "keys"]
    made = subprocess.run([*cli, "create", "--name", "rotating", "--scope", "score",
                           "--key-file", key_file], capture_output=True, text=True, check=True)
    key = made.stdout.strip()
    for live in key_servers:
        assert _eventually(live, key, 200), "a new key was not picked up"
    subprocess.run([*cli, "revoke", key.split("_")[1], "--key-file", key_file],
                   capture_output=True, check=True)
    for live in key_servers:
        assert _eventually(live, key, 401), "a revoked key kept working"
        reply = live.call("POST", "/score", key, json=_score_body())
        assert "unknown or revoked" in reply.json()["detail"]
        assert 'error="invalid_token"' in reply.headers["www-authenticate"]


def _eventually(live: Live, key: str, status: int) -> bool:
    """Whether /score answers ``status`` within 15 s (the file is re-read each second)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if live.call("POST", "/score", key, json=_score_body()).status_code == status:
            return True
        time.sleep(0.1)
    return False


def test_rate_limit_answers_429_with_retry_after(key_servers: list[Live]) -> None:
    """Check that a key limited to one request per 20 s gets 429 + Retry-After on its
    second request, and that other keys are not affected."""
    for live in key_servers:
        first = live.call("POST", "/score", live.creds["slow"], json=_score_body())
        assert first.status_code == 200, first.text
        second = live.call("POST", "/score", live.creds["slow"], json=_score_body())
        assert second.status_code == 429, second.text
        assert 1 <= int(second.headers["retry-after"]) <= 20
        assert second.json()["code"] == "rate_limited"
        assert live.call("POST", "/score", live.creds["score"],
                         json=_score_body()).status_code == 200


def test_endpoint_cli_sends_manymodels_token(key_servers: list[Live],
                                             certificate: tuple[Path, Path]) -> None:
    """Check that `manymodels endpoint show` is refused without MANYMODELS_TOKEN (with a
    hint), and works with an admin key, over HTTP and over HTTPS (SSL_CERT_FILE)."""
    from typer.testing import CliRunner

    from manymodels.cli import app

    runner = CliRunner()
    for live in key_servers:
        env = {"SSL_CERT_FILE": str(certificate[0]), "MANYMODELS_TOKEN": ""}
        refused = runner.invoke(app, ["endpoint", "show", "--url", live.url], env=env)
        assert refused.exit_code != 0 and "MANYMODELS_TOKEN" in str(refused.exception)
        live.sent.append(live.creds["admin"])
        shown = runner.invoke(app, ["endpoint", "show", "--url", live.url],
                              env={**env, "MANYMODELS_TOKEN": live.creds["admin"]})
        assert shown.exit_code == 0, shown.output
        assert "default" in shown.output and live.creds["admin"] not in shown.output


def _bad_tokens(secret: bytes) -> dict[str, str]:
    now = time.time()
    good = create_token(["score"], 600, subject="a", key=secret)
    head, _, sig = good.split(".")
    forged = jwt.utils.base64url_encode(
        b'{"sub":"a","aud":"manymodels","scope":"admin","iat":%d,"exp":%d}'
        % (now, now + 600)).decode()
    none_head = jwt.utils.base64url_encode(b'{"alg":"none","typ":"JWT"}').decode()
    return {
        "expired": create_token(["score"], 60, subject="a", key=secret, now=now - 7200),
        "not yet valid": create_token(["score"], 600, subject="a", key=secret,
                                      not_before=now + 3600),
        "wrong audience": create_token(["score"], 600, subject="a", key=secret,
                                       audience="someone-else"),
        "tampered": f"{head}.{forged}.{sig}",
        "alg none": f"{none_head}.{forged}.",
        "HS512": jwt.encode({"sub": "a", "aud": "manymodels", "scope": "score",
                             "iat": int(now), "exp": int(now) + 600}, secret,
                            algorithm="HS512"),
        "an API key": "mmk_0123456789ab_" + "A" * 43,
    }


def test_bad_tokens_answer_401_never_500(token_servers: list[Live]) -> None:
    """Check expired, not-yet-valid, wrong-audience, tampered, alg-none and HS512 tokens
    get 401 with error="invalid_token" on a scoring and an admin route, over HTTP(S)."""
    secret = token_servers[0].creds["secret"].encode()
    for live in token_servers:
        for label, token in _bad_tokens(secret).items():
            for method, path in (("POST", "/score"),
                                 ("POST", f"/v2/repository/models/{GLOBAL}/load")):
                reply = live.call(method, path, token, json=_score_body())
                assert reply.status_code == 401, (label, path, reply.status_code)
                assert 'error="invalid_token"' in reply.headers["www-authenticate"], label
        score_only = live.call("POST", f"/v2/repository/models/{GLOBAL}/unload",
                               live.creds["score"])
        assert score_only.status_code == 403 and "admin" in score_only.json()["error"]


def test_openapi_documents_the_bearer_scheme(token_servers: list[Live]) -> None:
    """Check that /openapi.json declares the Bearer scheme and each operation's scope."""
    document = token_servers[0].call("GET", "/openapi.json", token_servers[0].creds["read"]).json()
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert document["paths"]["/ping"]["get"]["security"] == []
    assert document["paths"]["/score"]["post"]["x-required-scope"] == "score"
    load = document["paths"]["/v2/repository/models/{name}/load"]["post"]
    assert load["x-required-scope"] == "admin" and load["security"] == [{"bearer": []}]


def test_schemathesis_finds_no_server_error(token_servers: list[Live],
                                            certificate: tuple[Path, Path],
                                            tmp_path: Path) -> None:
    """Check generated requests (schemathesis, bounded examples) with an admin token over
    HTTPS: never a 5xx, and every secured operation refuses requests without it."""
    live = token_servers[1]
    token = live.creds["admin"]
    live.sent.append(token)
    run = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", f"{live.url}/openapi.json",
         "--checks", "not_a_server_error,ignored_auth", "-H", f"Authorization: Bearer {token}",
         "--tls-verify", str(certificate[0]), "--max-examples", "8", "--seed", "15",
         "--no-shrink", "--workers", "1", "--phases", "examples,coverage,fuzzing",
         # PUT /admin/traffic {} legitimately stops all live traffic (then /score is 503)
         "--exclude-method", "PUT", "--exclude-method", "DELETE",
         "--output-sanitize", "true"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:]
    assert "passed" in run.stdout


# -- settings and policy, in-process -------------------------------------------------------
@pytest.mark.parametrize("path, scope", [
    ("/ping", None), ("/health", None), ("/v2/health/live", None), ("/v2/health/ready", None),
    ("/v2/health/other", None), ("/score", "score"), ("/invocations", "score"),
    ("/v2/models/m/infer", "score"), ("/v2/models/m/versions/1/infer", "score"),
    ("/models/m/score", "score"), ("/segments/score", "score"), ("/models//score", "read"),
    ("/models/a/b/score", "read"), ("/admin", "admin"), ("/admin/deployments", "admin"),
    ("/v2/repository/models/m/load", "admin"), ("/v2/repository/models/m/unload", "admin"),
    ("/v2/repository/index", "read"), ("/models", "read"), ("/stats", "read"),
    ("/metrics", "read"), ("/v2/models/m/stats", "read"), ("/ui", None), ("/ui/state", "read"),
    ("/ui/", "read"), ("/docs", "read"),
    ("/openapi.json", "read"), ("/", "read"), ("/score/", "read"), ("/administrator", "read"),
    ("/PING", "read"), ("/ping/", "read"), ("/batch/jobs", "batch"), ("/batch/jobs/j/log", "batch"),
    ("/batch", "batch"), ("/batchjobs", "read"),
])
def test_required_scope_by_path_default_deny(path: str, scope: str | None) -> None:
    """Check the scope decision per path, unknown paths needing read (default deny)."""
    assert required_scope(path) == scope


def test_non_loopback_defaults_to_keys_and_refuses_none(tmp_path: Path, bundle: Path) -> None:
    """Check auth defaults per host, and that `serve --host 0.0.0.0 --auth none` refuses to
    start with one line saying why unless --allow-unauthenticated is given."""
    assert [is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "localhost", "::1", "[::1]",
                                     "0.0.0.0", "10.1.2.3", "example.org", "::")] == \
        [True, True, True, True, True, False, False, False, False]
    assert auth_mode(ServeSettings(host="127.0.0.1")) == "none"
    assert auth_mode(ServeSettings(host="0.0.0.0")) == "key"
    with pytest.raises(SpecError, match="refusing to serve 0.0.0.0 without authentication"):
        auth_mode(ServeSettings(host="0.0.0.0", auth={"mode": "none"}))
    assert auth_mode(ServeSettings(host="0.0.0.0", auth={"mode": "none",
                                                         "allow_unauthenticated": True})) == "none"
    refused = subprocess.run([sys.executable, "-m", "manymodels", "serve", str(bundle), "--host",
                              "0.0.0.0", "--auth", "none", "--port", "9"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "refusing to serve 0.0.0.0" in refused.stderr and "--allow-unauthenticated" in \
        refused.stderr and "Traceback" not in refused.stderr


def test_token_mode_without_secret_refuses_to_start(tmp_path: Path, bundle: Path) -> None:
    """Check that --auth token with a missing secret file is one clear line, exit 2."""
    from manymodels.serve import create_app

    with pytest.raises(SpecError, match="cannot be read"):
        create_app(ServeSettings(bundle=str(bundle), auth={
            "mode": "token", "token_secret_file": str(tmp_path / "missing")}))


def test_rate_limiter_token_bucket() -> None:
    """Check the bucket: a burst of `burst`, then one request per 1/rate seconds."""
    from manymodels.credentials import Principal
    from manymodels.errors import RateLimited

    limiter = RateLimiter(rate=2.0, burst=3)
    who = Principal("a", frozenset({"score"}))
    for _ in range(3):
        limiter.check(who, 100.0)
    with pytest.raises(RateLimited) as caught:
        limiter.check(who, 100.0)
    assert caught.value.retry_after == 1
    limiter.check(who, 100.6)  # 0.5 s refills one request
    with pytest.raises(RateLimited):
        limiter.check(who, 100.6)
    limiter.check(Principal("b", frozenset({"score"})), 100.6)  # a bucket per subject
    own = Principal("c", frozenset({"score"}), rate_limit=0.1)
    limiter.check(own, 0.0)
    with pytest.raises(RateLimited) as slow:
        limiter.check(own, 1.0)
    assert slow.value.retry_after == 9
    RateLimiter(rate=None).check(who, 0.0)


def test_auth_settings_reach_worker_processes(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """Check that nested auth settings survive to_env (how --workers N passes them on),
    and that MANYMODELS_AUTH__* variables and a spec's auth: section merge field by field."""
    from manymodels.serve import load_settings

    settings = ServeSettings(host="0.0.0.0", auth={"mode": "token", "rate_limit": 5.0,
                                                   "token_secret_file": "/s"},
                             ssl_certfile="/c.pem", ssl_keyfile="/k.pem")
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    assert ServeSettings() == settings
    for name in settings.to_env():
        monkeypatch.delenv(name)
    spec = tmp_path / "mine.yaml"
    spec.write_text("auth:\n  mode: key\n  rate_limit: 2\n")
    monkeypatch.setenv("MANYMODELS_AUTH__RATE_LIMIT", "7")
    merged = load_settings(spec, auth={"key_file": "/keys.json", "mode": None})
    assert (merged.auth.mode, merged.auth.rate_limit, merged.auth.key_file) == \
        ("key", 7.0, "/keys.json")
    spec.write_text("auth:\n  mdoe: key\n")
    with pytest.raises(SpecError, match="mdoe"):
        load_settings(spec)


#: One flaw per record field a hand edit can break (the hash, a scope, the id's type).
FLAWED_RECORDS = {"hash": {"sha256": "zz" * 32}, "scope": {"scopes": ["root"]},
                  "id": {"id": 123456789012}}


def _flawed(good: str, flaw: str) -> str:
    document = json.loads(good)
    document["keys"][1].update(FLAWED_RECORDS[flaw])
    return json.dumps(document)


def test_corrupt_key_file_keeps_last_good_keys(bundle: Path, tmp_path: Path) -> None:
    """Check that a record with a bad hash, an unknown scope or an integer id, written
    into the key file of a running server, never gives a 500: the last good keys keep
    working, one log line names the record per bad version, and a good file is taken
    again; the server's whole log holds no traceback and no key."""
    store = KeyFile(tmp_path / "keys.json")
    _, key = store.create("app", ["score"])
    _, other = store.create("other", ["score"])
    good = store.path.read_text()
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "manymodels", "serve", str(bundle), "--port", "{port}",
               "--auth", "key", "--key-file", str(store.path), "--log-level", "info"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MANYMODELS_AUTH__KEY_RELOAD_SECONDS": "0.2"}
    with answering(command, "/ping", "manymodels serve", log=log, env=env) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        def status(credential: str) -> int:
            return client.post("/score", json=_score_body(), headers={
                "Authorization": f"Bearer {credential}"}).status_code

        assert status(key) == 200
        for flaw in FLAWED_RECORDS:
            atomic_write_text(store.path, _flawed(good, flaw), mode=0o600)
            deadline = time.monotonic() + 1.5  # several reload intervals
            while time.monotonic() < deadline:
                assert status(key) == 200 and status(other) == 200, flaw
        atomic_write_text(store.path, good, mode=0o600)
        store.revoke("other")  # a good file again, without one of the keys
        deadline = time.monotonic() + 15
        while status(other) != 401:
            assert time.monotonic() < deadline, "the good key file was not taken again"
            time.sleep(0.1)
        assert status(key) == 200
    text = assert_clean_log(log, [key, other, *_secret_parts(key), *_secret_parts(other)])
    refusals = [line for line in text.splitlines() if "keeping the 2 keys" in line]
    assert len(refusals) == len(FLAWED_RECORDS), refusals  # one line per bad version
    assert all(f"{store.path}: record 1" in line for line in refusals)


@pytest.mark.parametrize("flaw", sorted(FLAWED_RECORDS))
def test_corrupt_key_file_refuses_to_start(bundle: Path, tmp_path: Path, flaw: str) -> None:
    """Check that `manymodels serve` refuses a key file with a bad record in one line
    naming the file and the record (exit 2), with no traceback."""
    store = KeyFile(tmp_path / "keys.json")
    store.create("app", ["score"])
    store.create("other", ["score"])
    atomic_write_text(store.path, _flawed(store.path.read_text(), flaw), mode=0o600)
    refused = subprocess.run([sys.executable, "-m", "manymodels", "serve", str(bundle),
                              "--auth", "key", "--key-file", str(store.path), "--port", "9"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr
    assert f"key file {store.path}: record 1" in " ".join(refused.stderr.split())
