"""A fleet of ``manymodels serve`` replicas behind a real proxy, sharded by key.

Each replica is an ordinary server over the same bundle. The proxy (nginx by default,
HAProxy documented) hashes each request's key onto a ring of replicas (``hash $key
consistent``: ketama), so every model stays resident on about one replica and the
fleet holds the sum of the replicas' cache budgets; when a replica dies only its keys
move to the next replica on the ring, the others keep their caches. The key is what
the key-carrying routes put where a proxy sees it without reading the body:

- ``/models/{name}/score`` and ``/v2/models/{name}/...``: the model name in the path;
- ``/segments/score``: ``?key=...`` or the ``x-manymodels-key`` header.

Requests without a key (``/score``, ``/models``, ``/docs``) are spread by request id.
:func:`nginx_config` and :func:`haproxy_config` write the configurations;
:class:`LocalFleet` starts replicas and nginx on one machine, for trying it out and
for the tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from manymodels.errors import SpecError
from manymodels.keys import KEY_HEADER

__all__ = ["LocalFleet", "haproxy_config", "nginx_config", "parse_replicas"]

_HEADER_VAR = "$http_" + KEY_HEADER.replace("-", "_")


def parse_replicas(text: str | Sequence[str]) -> list[str]:
    """``"127.0.0.1:8001,127.0.0.1:8002"`` -> ``["127.0.0.1:8001", "127.0.0.1:8002"]``."""
    items = text.split(",") if isinstance(text, str) else list(text)
    replicas = [r.strip() for r in items if r.strip()]
    if not replicas:
        raise SpecError("--replicas needs at least one host:port")
    for replica in replicas:
        host, sep, port = replica.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise SpecError(f"--replicas: {replica!r} is not host:port")
    return replicas


def nginx_config(replicas: Sequence[str], listen: str = "127.0.0.1:8080",
                 runtime_dir: str | None = None, fail_timeout: int = 10) -> str:
    """An nginx configuration routing by key over ``replicas`` with consistent hashing.

    ``runtime_dir`` (set by :class:`LocalFleet`) puts the pid file, logs and temporary
    files there, so that nginx runs unprivileged as a plain process; without it the
    result is an ``http``-level snippet for ``/etc/nginx/conf.d/``.
    """
    servers = "\n".join(f"        server {r} max_fails=1 fail_timeout={fail_timeout}s;"
                        for r in replicas)
    http = f"""\
    # The routing key: the model name of the path, else ?key=, else the key header.
    map $uri $manymodels_path_key {{
        ~^/models/(?<mm_model>[^/]+)/score$     $mm_model;
        ~^/v2/models/(?<mm_v2>[^/]+)(/|$)      $mm_v2;
        default                                 "";
    }}
    map "$manymodels_path_key|$arg_key|{_HEADER_VAR}" $manymodels_key {{
        ~^(?<mm_k1>[^|]+)\\|                     $mm_k1;
        ~^\\|(?<mm_k2>[^|]+)\\|                   $mm_k2;
        ~^\\|\\|(?<mm_k3>.+)$                     $mm_k3;
        default                                 $request_id;
    }}

    upstream manymodels {{
        hash $manymodels_key consistent;
{servers}
        keepalive 64;
    }}

    server {{
        listen {listen};
        client_max_body_size 64m;
        location / {{
            proxy_pass http://manymodels;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            # a dead replica: retry on the next one of the ring (only its keys move);
            # scoring has no side effects, so a POST may be retried too
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries 3;
            proxy_connect_timeout 2s;
            proxy_read_timeout 300s;
        }}
    }}
"""
    if runtime_dir is None:
        return "# manymodels fleet: include in the http block (e.g. /etc/nginx/conf.d/)\n" + http
    run = runtime_dir
    return f"""\
# manymodels fleet (written by `manymodels fleet up`)
daemon off;
worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {run}/body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
{http}}}
"""


def haproxy_config(replicas: Sequence[str], listen: str = "127.0.0.1:8080") -> str:
    """The same routing for HAProxy (2.6+): consistent hashing of the same key."""
    servers = "\n".join(f"    server r{i} {r} check inter 2s fall 1 rise 2"
                        for i, r in enumerate(replicas, 1))
    return f"""\
# manymodels fleet for HAProxy 2.6+
defaults
    mode http
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    option redispatch
    retries 2

frontend manymodels
    bind {listen}
    # the routing key: the model name of the path, else ?key=, else the key header
    http-request set-var(txn.key) req.hdr({KEY_HEADER})
    http-request set-var(txn.key) url_param(key) if {{ url_param(key) -m found }}
    http-request set-var(txn.key) path,field(3,/) if {{ path_beg /models/ }}
    http-request set-var(txn.key) path,field(4,/) if {{ path_beg /v2/models/ }}
    default_backend replicas

backend replicas
    hash-type consistent
    balance hash var(txn.key)
{servers}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(url: str, process: subprocess.Popen[Any], timeout: float) -> None:
    # httpx only when talking to a running server
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SpecError(f"{url} exited with code {process.returncode} while starting")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SpecError(f"{url} did not answer within {timeout:.0f} s")


@dataclass
class Replica:
    """One ``manymodels serve`` process of a :class:`LocalFleet`."""

    address: str
    process: subprocess.Popen[Any]

    @property
    def url(self) -> str:
        return f"http://{self.address}"


@dataclass
class LocalFleet:
    """Replicas + nginx on this machine (``manymodels fleet up``); a context manager.

    Parameters
    ----------
    bundle
        What every replica serves (directory, ``models:/`` URI or ``s3://`` URL).
    replicas
        How many ``manymodels serve`` processes.
    listen
        The proxy's ``host:port`` (port 0: a free one).
    serve_args
        Extra ``manymodels serve`` flags for every replica (e.g. ``--max-memory-mb 200``).
    """

    bundle: str
    replicas: int = 3
    listen: str = "127.0.0.1:8080"
    serve_args: Sequence[str] = ()
    start_timeout: float = 120.0
    members: list[Replica] = field(default_factory=list)
    proxy: subprocess.Popen[Any] | None = None
    runtime_dir: Path | None = None
    _logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.listen}"

    def start(self) -> LocalFleet:
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                          else None)
        if nginx is None:
            raise SpecError("nginx is not installed: apt-get install nginx (or write the "
                            "configuration with `manymodels fleet config` for your own proxy)")
        host, _, port = self.listen.rpartition(":")
        if port == "0":
            self.listen = f"{host}:{_free_port()}"
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="manymodels-fleet-"))
        try:
            for _ in range(self.replicas):
                self._start_replica()
            for replica in self.members:
                _wait_for(replica.url + "/health", replica.process, self.start_timeout)
            conf = self.runtime_dir / "nginx.conf"
            conf.write_text(nginx_config([r.address for r in self.members], self.listen,
                                         str(self.runtime_dir)))
            log = open(self.runtime_dir / "nginx.out", "wb")  # noqa: SIM115
            self._logs.append(log)
            self.proxy = subprocess.Popen([nginx, "-c", str(conf), "-p", str(self.runtime_dir)],
                                          stdout=log, stderr=subprocess.STDOUT)
            _wait_for(self.url + "/health", self.proxy, self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_replica(self) -> None:
        assert self.runtime_dir is not None
        address = f"127.0.0.1:{_free_port()}"
        log = open(self.runtime_dir / f"replica-{len(self.members) + 1}.log", "wb")  # noqa: SIM115
        self._logs.append(log)
        command = [sys.executable, "-m", "manymodels", "serve", self.bundle, "--host",
                   "127.0.0.1", "--port", address.rpartition(":")[2], *self.serve_args]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.members.append(Replica(address, process))

    def kill(self, index: int) -> None:
        """Kill replica ``index`` with SIGKILL (a crash, for trying failover)."""
        process = self.members[index].process
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    def stop(self) -> None:
        processes = [r.process for r in self.members]
        if self.proxy is not None:
            processes.insert(0, self.proxy)
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in self._logs:
            log.close()
        if self.runtime_dir is not None:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            self.runtime_dir = None

    def __enter__(self) -> LocalFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
