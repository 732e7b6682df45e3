"""A fleet of ``manymodels serve`` replicas behind a real proxy, sharded by key.

Each replica is an ordinary server over the same bundle. The proxy (nginx by default, or
HAProxy) hashes each request's key onto a ring of replicas (``hash $key consistent``:
ketama), so every model stays resident on about one replica and the fleet holds the sum
of the replicas' cache budgets; when a replica dies only its keys move to the next
replica on the ring, the others keep their caches. The key is what the key-carrying
routes put where a proxy sees it without reading the body:

- ``/models/{name}/score`` and ``/v2/models/{name}/...``: the model name in the path;
- ``/segments/score``: ``?key=...`` or the ``x-manymodels-key`` header.

Both proxies hash one **canonical key** per model, whatever the route: a segment key
(header, raw or percent-encoded ``?key=``) as its ``column=value`` pairs joined by
``__`` (``store=42__brand=tropicana``), and a model name without its target prefix
(``quantity__store=42__brand=tropicana`` -> the same), so a segment's own model is
reached on one replica by every route. Requests without a key (``/score``,
``/models``, ``/docs``) are spread by request id. :func:`nginx_config` and
:func:`haproxy_config` write the configurations; :class:`LocalFleet` starts replicas and
the proxy on one machine and restarts a replica that dies (``manymodels fleet up``).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from manymodels.errors import SpecError
from manymodels.keys import KEY_HEADER

__all__ = ["LocalFleet", "haproxy_config", "nginx_config", "parse_replicas"]

_HEADER_VAR = "$http_" + KEY_HEADER.replace("-", "_")
#: Segment columns the nginx configuration canonicalises a key of (one regex per count).
MAX_KEY_COLUMNS = 8
#: What every proxy's configuration accepts as a request body (the server's own limit,
#: ``--max-body-mb``, refuses larger ones with its JSON problem).
MAX_BODY_MB = 64


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


def _nginx_key_maps() -> str:
    """nginx ``map`` blocks computing ``$manymodels_key``, the canonical key (module doc).

    nginx cannot decode a query parameter nor substitute inside a variable, so a segment
    key is matched as up to :data:`MAX_KEY_COLUMNS` pairs whose separators may be
    percent-encoded (``%3D``, ``%2C``: a ``?key=`` encoded as a whole), and rebuilt with
    ``__``; the path (``$uri``) is already decoded.
    """
    part = r"(?:[^,=%|]|%(?!2[cC]|3[dD]))"
    equals, comma = r"(?:=|%3[dD])", r"(?:,|%2[cC])"
    rows = []
    for k in range(1, MAX_KEY_COLUMNS + 1):
        pattern = comma.join(f"(?<mm_c{i}>{part}+){equals}(?<mm_v{i}>{part}*)"
                             for i in range(1, k + 1))
        value = "__".join(f"${{mm_c{i}}}=${{mm_v{i}}}" for i in range(1, k + 1))
        rows.append(f'        "~^{pattern}$" "{value}";')
    pairs = "\n".join(rows)
    return f"""\
    # The routing key, one per model whatever the route: a model name without its target
    # prefix (the path, decoded), else the segment key of ?key= or the key header with
    # its pairs joined by "__" (quantity__store=42__brand=b and store=42,brand=b, raw or
    # percent-encoded, are all store=42__brand=b); requests without one by request id.
    map $uri $manymodels_path_key {{
        ~^/models/[^/]*?__(?<mm_m1>[^/]+)/score$        $mm_m1;
        ~^/models/(?<mm_m2>[^/]+)/score$                $mm_m2;
        ~^/v2/models/[^/]*?__(?<mm_m3>[^/]+)(/|$)       $mm_m3;
        ~^/v2/models/(?<mm_m4>[^/]+)(/|$)               $mm_m4;
        default                                         "";
    }}
    map "$arg_key|{_HEADER_VAR}" $manymodels_segment_text {{
        ~^(?<mm_q>[^|]+)\\|                             $mm_q;
        ~^\\|(?<mm_h>.+)$                               $mm_h;
        default                                         "";
    }}
    map $manymodels_segment_text $manymodels_segment_key {{
{pairs}
        default                                         $manymodels_segment_text;
    }}
    map "$manymodels_path_key|$manymodels_segment_key" $manymodels_key {{
        ~^(?<mm_k1>[^|]+)\\|                            $mm_k1;
        ~^\\|(?<mm_k2>.+)$                              $mm_k2;
        default                                         $request_id;
    }}
"""


def nginx_config(replicas: Sequence[str], listen: str = "127.0.0.1:8080",
                 runtime_dir: str | None = None, fail_timeout: int = 10) -> str:
    """An nginx configuration routing by key over ``replicas`` with consistent hashing.

    ``runtime_dir`` (set by :class:`LocalFleet`) puts the pid file, logs and temporary
    files there, so that nginx runs as a plain process; started as root, its worker runs
    as ``nobody`` and owns the temporary folders (a request body over the in-memory
    buffer is written there). Without it the result is an ``http``-level snippet for
    ``/etc/nginx/conf.d/``.
    """
    servers = "\n".join(f"        server {r} max_fails=1 fail_timeout={fail_timeout}s;"
                        for r in replicas)
    http = _nginx_key_maps() + f"""
    upstream manymodels {{
        hash $manymodels_key consistent;
{servers}
        keepalive 64;
    }}

    server {{
        listen {listen};
        client_max_body_size {MAX_BODY_MB}m;
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
    user = ""
    if os.geteuid() == 0:  # the master runs as root, its worker as an unprivileged user
        worker = _worker_user()
        user = f"user {worker[0]} {worker[1]};\n"
    return f"""\
# manymodels fleet (written by `manymodels fleet up`)
daemon off;
{user}worker_processes 1;
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


def _worker_user() -> tuple[str, str]:
    """The user and group nginx's worker runs as when started by root."""
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_name, grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        return "root", "root"  # no unprivileged user to hand the worker to


def haproxy_config(replicas: Sequence[str], listen: str = "127.0.0.1:8080",
                   runtime_dir: str | None = None) -> str:
    """The same routing for HAProxy (2.6+): consistent hashing of the same canonical key.

    The key header is read whole (``req.fhdr``: ``req.hdr`` would split it at its
    commas), ``?key=`` and the path are percent-decoded (``url_dec``) before the pairs
    are joined by ``__`` and a model name loses its target prefix. ``runtime_dir`` (set
    by :class:`LocalFleet`) adds a ``global`` section with the pid file there.
    """
    header = f"req.fhdr({KEY_HEADER})"
    pairs = "url_dec,regsub(\\\\x2c,__,g)"  # \x2c: a comma, which would end the argument
    name = "url_dec,regsub(^.*?__,)"  # the target prefix dropped
    # a replica that refuses a connection leaves the ring at once (not after three failed
    # checks): its keys then go where the ring sends them, not where a retry was sent
    servers = "\n".join(f"    server r{i} {r} check inter 2s fall 3 rise 2 observe layer4 "
                        f"error-limit 1 on-error mark-down" for i, r in enumerate(replicas, 1))
    head = "" if runtime_dir is None else f"""\
global
    pidfile {runtime_dir}/haproxy.pid
    maxconn 1024

"""
    return f"""\
# manymodels fleet for HAProxy 2.6+
{head}defaults
    mode http
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    option redispatch
    option http-keep-alive
    retries 3
    # scoring has no side effects: a request that met a dead replica is sent again; a
    # retry needs the whole request in haproxy's buffer, body included, before it is sent
    option http-buffer-request
    retry-on conn-failure empty-response junk-response response-timeout 502 503

frontend manymodels
    bind {listen}
    # the routing key, one per model whatever the route: a model name without its target
    # prefix (path decoded), else the segment key of ?key= (decoded) or the key header
    # (read whole) with its pairs joined by "__"; requests without one by request id
    http-request set-var(txn.key) uuid
    http-request set-var(txn.key) {header},{pairs} if {{ {header} -m found }}
    http-request set-var(txn.key) url_param(key),{pairs} if {{ url_param(key) -m found }}
    http-request set-var(txn.key) path,field(3,/),{name} if {{ path_beg /models/ }}
    http-request set-var(txn.key) path,field(4,/),{name} if {{ path_beg /v2/models/ }}
    default_backend replicas

backend replicas
    hash-type consistent
    balance hash var(txn.key)
    option httpchk GET /health
    timeout check 5s
{servers}
"""


def _free_ports(count: int, taken: Collection[int] = ()) -> list[int]:
    """``count`` distinct free loopback ports, none of them in ``taken``: every socket stays
    bound until all are picked, so the kernel cannot hand one port out twice (a replica
    given the proxy's port answers the proxy's readiness check in its place)."""
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket()
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
            if port not in taken:
                ports.append(port)
        return ports
    finally:
        for sock in sockets:
            sock.close()


def _check_free(listen: str) -> None:
    """Refuse a proxy address something already listens on: the proxy would exit, and
    whatever holds the port would answer the readiness check as if it were the fleet."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.create_server((host, int(port)), family=family):
            pass
    except (OSError, ValueError) as exc:
        raise SpecError(f"the fleet cannot listen on {listen}: {exc}; pick another "
                        f"address (--listen)") from None


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
    """One ``manymodels serve`` process of a :class:`LocalFleet` (restarted in place)."""

    address: str
    process: subprocess.Popen[Any]
    started: float = field(default_factory=time.monotonic)
    #: Times the process was started again after it exited.
    restarts: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.address}"


PROXIES = ("nginx", "haproxy")


def _proxy_binary(proxy: str) -> str:
    if proxy not in PROXIES:
        raise SpecError(f"--proxy must be one of {', '.join(PROXIES)}, got {proxy!r}")
    found = shutil.which(proxy) or (f"/usr/sbin/{proxy}" if os.path.exists(f"/usr/sbin/{proxy}")
                                    else None)
    if found is None:
        raise SpecError(f"{proxy} is not installed: apt-get install {proxy} (or write the "
                        f"configuration with `manymodels fleet config` for your own proxy)")
    return found


@dataclass
class LocalFleet:
    """Replicas + a proxy on this machine (``manymodels fleet up``); a context manager.

    A replica that exits is started again on its address, after a pause that doubles
    with each exit soon after a start (``backoff`` seconds, up to ``max_backoff``); the
    proxy sends its keys to the others meanwhile.

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
    proxy
        ``nginx`` or ``haproxy``.
    restart
        Start a replica again when it exits (``False``: leave it dead).
    say
        Called with one line per replica exit and restart.
    """

    bundle: str
    replicas: int = 3
    listen: str = "127.0.0.1:8080"
    serve_args: Sequence[str] = ()
    start_timeout: float = 120.0
    proxy_name: str = "nginx"
    restart: bool = True
    backoff: float = 0.5
    max_backoff: float = 30.0
    say: Callable[[str], None] | None = None
    members: list[Replica] = field(default_factory=list)
    proxy: subprocess.Popen[Any] | None = None
    runtime_dir: Path | None = None
    _logs: list[IO[bytes]] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _watcher: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://{self.listen}"

    def start(self) -> LocalFleet:
        binary = _proxy_binary(self.proxy_name)
        host, _, port = self.listen.rpartition(":")
        if port == "0":
            port = str(_free_ports(1)[0])
            self.listen = f"{host}:{port}"
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="manymodels-fleet-"))
        if os.geteuid() == 0:  # nginx's worker (nobody) must reach its temporary folders
            self.runtime_dir.chmod(0o711)
        try:
            taken = {int(port)} if port.isdigit() else set()
            for free in _free_ports(self.replicas, taken):
                address = f"127.0.0.1:{free}"
                self.members.append(Replica(address, self._spawn(address, len(self.members))))
            for replica in self.members:
                _wait_for(replica.url + "/health", replica.process, self.start_timeout)
            _check_free(self.listen)
            self.proxy = self._start_proxy(binary)
            _wait_for(self.url + "/health", self.proxy, self.start_timeout)
        except BaseException:
            self.stop()
            raise
        if self.restart:
            self._watcher = threading.Thread(target=self._watch, name="manymodels-fleet",
                                             daemon=True)
            self._watcher.start()
        return self

    def _start_proxy(self, binary: str) -> subprocess.Popen[Any]:
        assert self.runtime_dir is not None
        run = self.runtime_dir
        addresses = [r.address for r in self.members]
        log = open(run / f"{self.proxy_name}.out", "wb")  # noqa: SIM115
        self._logs.append(log)
        if self.proxy_name == "haproxy":
            conf = run / "haproxy.cfg"
            conf.write_text(haproxy_config(addresses, self.listen, str(run)))
            command = [binary, "-f", str(conf), "-db"]
        else:
            conf = run / "nginx.conf"
            conf.write_text(nginx_config(addresses, self.listen, str(run)))
            command = [binary, "-c", str(conf), "-p", str(run)]
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def _spawn(self, address: str, index: int) -> subprocess.Popen[Any]:
        assert self.runtime_dir is not None
        log = open(self.runtime_dir / f"replica-{index + 1}.log", "ab")  # noqa: SIM115
        self._logs.append(log)
        command = [sys.executable, "-m", "manymodels", "serve", self.bundle, "--host",
                   "127.0.0.1", "--port", address.rpartition(":")[2], *self.serve_args]
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def _watch(self) -> None:
        """Start each replica that exited again, after its backoff (a thread)."""
        due: dict[int, float] = {}
        quick_exits: dict[int, int] = {}
        while not self._stopping.wait(0.2):
            for index, replica in enumerate(self.members):
                code = replica.process.poll()
                if code is None:
                    if time.monotonic() - replica.started > 60:
                        quick_exits.pop(index, None)  # up a minute: a fresh backoff
                    continue
                now = time.monotonic()
                if index not in due:
                    exits = quick_exits[index] = quick_exits.get(index, 0) + 1
                    delay = min(self.max_backoff, self.backoff * 2 ** (exits - 1))
                    due[index] = now + delay
                    self._say(f"replica {index + 1} ({replica.address}) exited with code "
                              f"{code}; starting it again in {delay:g} s")
                if now < due[index]:
                    continue
                with self._lock:
                    if self._stopping.is_set():
                        return
                    replica.process = self._spawn(replica.address, index)
                    replica.started, replica.restarts = time.monotonic(), replica.restarts + 1
                del due[index]
                self._say(f"replica {index + 1} ({replica.address}) started again "
                          f"(restart {replica.restarts})")

    def _say(self, line: str) -> None:
        if self.say is not None:
            self.say(line)

    def kill(self, index: int) -> None:
        """Kill replica ``index`` with SIGKILL (a crash, for trying failover)."""
        process = self.members[index].process
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    def stop(self) -> None:
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
            self._watcher = None
        with self._lock:
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
