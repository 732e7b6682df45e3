"""CLI commands ``manymodels keys create|list|revoke`` and ``manymodels token create``.

Keys and tokens are what ``manymodels serve --auth key|token`` accepts as
``Authorization: Bearer ...``. A key or token is printed once, alone on stdout (so
``KEY=$(manymodels keys create ...)`` works); everything else goes to stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["register"]

keys_app = typer.Typer(help="API keys of the endpoint: create, list, revoke (hashes only "
                       "on disk).", no_args_is_help=True)
token_app = typer.Typer(help="Expiring JWTs for the endpoint (--auth token).",
                        no_args_is_help=True)

KeyFileOption = Annotated[str | None, typer.Option(
    "--key-file", help="Key file (default ~/.config/manymodels/keys.json)")]
ScopeOption = Annotated[list[str], typer.Option(
    "--scope",
    help="read | score | batch | admin (repeat for several; admin implies the others)")]


def _key_file(path: str | None) -> Path:
    from manymodels.credentials import default_key_file

    return Path(path) if path else default_key_file()


def _scopes(given: list[str]) -> list[str]:
    """``--scope a --scope b`` or ``--scope a,b``, checked against the known scopes."""
    from manymodels.credentials import expand_scopes

    scopes = [s.strip() for item in given for s in item.split(",") if s.strip()]
    expand_scopes(scopes)
    return scopes


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who the key is for, e.g. app1 (two active keys "
                                      "per name, for rotation)")],
    scope: ScopeOption,
    rate_limit: Annotated[float | None, typer.Option(
        help="Requests/s for this key (default: the server's auth.rate_limit)")] = None,
    key_file: KeyFileOption = None,
) -> None:
    """Create a key and print it once; the key file keeps only its SHA-256."""
    from manymodels.credentials import KeyFile

    store = KeyFile(_key_file(key_file))
    record, key = store.create(name, _scopes(scope), rate_limit=rate_limit)
    Console(stderr=True).print(
        f"created key [bold]{record.id}[/] for '{record.name}' (scopes "
        f"{', '.join(record.scopes)}) in {store.path}; it is shown only now",
        highlight=False, soft_wrap=True)
    typer.echo(key)


@keys_app.command("list")
def keys_list(
    key_file: KeyFileOption = None,
    all_keys: Annotated[bool, typer.Option("--all", help="Include revoked keys")] = False,
) -> None:
    """List the keys (id, name, scopes, created, revoked); never a key or a hash."""
    from manymodels.credentials import KeyFile

    store = KeyFile(_key_file(key_file))
    records = [r for r in store.records() if all_keys or r.active]
    table = Table("id", "name", "scopes", "rate limit", "created", "revoked")
    for r in records:
        table.add_row(r.id, r.name, ",".join(r.scopes),
                      "-" if r.rate_limit is None else f"{r.rate_limit:g}/s", r.created,
                      r.revoked or "-")
    Console(soft_wrap=True).print(table)
    if not records:
        Console(stderr=True).print(f"no {'' if all_keys else 'active '}keys in {store.path}",
                                   highlight=False)


@keys_app.command("revoke")
def keys_revoke(
    target: Annotated[str, typer.Argument(help="Key id (from `keys list`), or a name to "
                                          "revoke all of its keys")],
    key_file: KeyFileOption = None,
) -> None:
    """Revoke keys; a running server stops accepting them within a second."""
    from manymodels.credentials import KeyFile

    store = KeyFile(_key_file(key_file))
    for record in store.revoke(target):
        Console(stderr=True).print(f"revoked key [bold]{record.id}[/] of '{record.name}'",
                                   highlight=False)


@token_app.command("create")
def token_create(
    scope: ScopeOption,
    ttl: Annotated[str, typer.Option(help="Lifetime: 30s, 15m, 1h, 7d")] = "1h",
    subject: Annotated[str, typer.Option(help="The token's 'sub': who it is for (the unit "
                                         "of rate limits)")] = "cli",
    audience: Annotated[str, typer.Option(help="The 'aud' claim the server requires")
                        ] = "manymodels",
    issuer: Annotated[str | None, typer.Option(help="An 'iss' claim")] = None,
    secret_file: Annotated[str | None, typer.Option(
        help="HS256 secret (default ~/.config/manymodels/token-secret, created if absent)")
                           ] = None,
    private_key_file: Annotated[str | None, typer.Option(
        help="Sign with this PEM private key instead (RSA → RS256, EC P-256 → ES256)")] = None,
) -> None:
    """Print a signed JWT with exp, iat, aud, sub and scope."""
    from manymodels.credentials import (
        create_token,
        default_token_secret_file,
        parse_ttl,
        read_token_secret,
        write_token_secret,
    )

    seconds = parse_ttl(ttl)
    scopes = _scopes(scope)
    if private_key_file is not None:
        key, algorithm = _private_key(Path(private_key_file))
    else:
        path = Path(secret_file) if secret_file else default_token_secret_file()
        if not path.exists():
            write_token_secret(path)
            Console(stderr=True).print(f"created the HS256 secret {path} (mode 0600); serve "
                                       f"with --auth token --token-secret-file {path}",
                                       highlight=False, soft_wrap=True)
        key, algorithm = read_token_secret(path), "HS256"
    typer.echo(create_token(scopes, seconds, subject=subject, key=key, algorithm=algorithm,
                            audience=audience, issuer=issuer))


def _private_key(path: Path) -> tuple[bytes, str]:
    """The PEM bytes of ``path`` and the algorithm its key type signs with."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from manymodels.errors import SpecError

    try:
        data = path.read_bytes()
        key = load_pem_private_key(data, password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SpecError(f"private key {path} is not a readable unencrypted PEM key "
                        f"({type(exc).__name__})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        return data, "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return data, "ES256"
    raise SpecError(f"private key {path} must be RSA (RS256) or EC P-256 (ES256)")


def register(app: typer.Typer) -> None:
    """Add ``keys`` and ``token`` to ``app``."""
    app.add_typer(keys_app, name="keys")
    app.add_typer(token_app, name="token")
