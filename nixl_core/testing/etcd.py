"""A real etcd server for tests: :class:`EtcdServer` runs the ``etcd`` binary on free ports.

::

    with EtcdServer() as etcd:
        store = EtcdStore(etcd.endpoint, namespace="/t", ttl=2)

The server is a single member with its data in a fresh directory (under ``/dev/shm`` when it
exists: etcd syncs its log on every write); it listens on ``host`` only. :meth:`EtcdServer.stop`
then :meth:`EtcdServer.start` restart it on the same ports and data (its keys, leases and
revisions survive), for tests of clients that must ride out a restart.

``cmd_prefix`` runs etcd inside something, e.g. ``["ip", "netns", "exec", "ns1"]`` with
``host`` an address of that namespace; the health check runs here, so the address must be
reachable from this process. Free ports are picked here (bind to port 0, then release), which in
another namespace is a guess: a start that fails because a port is taken is retried on new ports.

Only the standard library is used (no etcd client is needed to run a server).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nixl_core.discovery.etcd import EtcdStore

__all__ = ["EtcdFixture", "EtcdServer", "EtcdServerError", "delete_prefix", "etcd_binary"]

#: Attempts at picking free ports before giving up.
_PORT_ATTEMPTS = 5


class EtcdServerError(RuntimeError):
    """etcd could not be started (the message carries the end of its log)."""


def etcd_binary() -> str | None:
    """The ``etcd`` executable on PATH (or in ``$NIXL_ETCD_BIN``), None if there is none."""
    explicit = os.environ.get("NIXL_ETCD_BIN")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("etcd")


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError:  # the address lives elsewhere (another namespace): guess from here
            s.close()
            with socket.socket(family, socket.SOCK_STREAM) as t:
                t.bind(("::" if family == socket.AF_INET6 else "", 0))
                return int(t.getsockname()[1])
        return int(s.getsockname()[1])


class EtcdServer:
    """One etcd member on ``host``, started by :meth:`start` (or ``with``), stopped by
    :meth:`stop`, removed with its data by :meth:`close`.

    Args:
        host: the address etcd listens on (client and peer).
        client_port: the client port; 0 picks a free one (kept across restarts).
        peer_port: the peer port; 0 picks a free one.
        cmd_prefix: a command etcd is run under (``["ip", "netns", "exec", "ns1"]``).
        binary: the etcd executable (default: :func:`etcd_binary`).
        startup_timeout: seconds to wait for etcd to answer its health check.
        extra_args: more etcd flags.
        data_parent: where the data directory is made (default ``/dev/shm`` if it exists).

    Attributes:
        endpoint: ``host:port`` of the client URL (IPv6 in brackets).
        url: ``http://host:port``.
        data_dir: the member's data directory.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        client_port: int = 0,
        peer_port: int = 0,
        cmd_prefix: Sequence[str] = (),
        binary: str | None = None,
        startup_timeout: float = 20.0,
        extra_args: Sequence[str] = (),
        data_parent: str | None = None,
    ) -> None:
        self.host = host
        self._client_port = client_port
        self._peer_port = peer_port
        self._pick_client = client_port == 0
        self._pick_peer = peer_port == 0
        self.cmd_prefix = list(cmd_prefix)
        found = binary or etcd_binary()
        if found is None:
            raise EtcdServerError("no etcd binary on PATH (Debian: apt-get install etcd-server)")
        self.binary = found
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        if data_parent is None and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
            data_parent = "/dev/shm"
        self._data_parent = data_parent
        self._root: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None
        self.name = f"nixl-{uuid.uuid4().hex[:8]}"

    # -- addresses -----------------------------------------------------------------------------

    @property
    def _bracketed(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def port(self) -> int:
        """The client port (0 before the first start picked one)."""
        return self._client_port

    @property
    def endpoint(self) -> str:
        """``host:port`` of the client URL."""
        return f"{self._bracketed}:{self._client_port}"

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.endpoint}"

    @property
    def data_dir(self) -> Path:
        """The member's data directory (made by the first start)."""
        if self._root is None:
            raise EtcdServerError("etcd was never started: it has no data directory yet")
        return self._root / "data"

    @property
    def running(self) -> bool:
        """True while the etcd process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The etcd process id (of ``cmd_prefix`` when there is one), None when stopped."""
        return self._proc.pid if self._proc is not None else None

    # -- life ----------------------------------------------------------------------------------

    def start(self) -> EtcdServer:
        """Start etcd and wait for it to be healthy; again after :meth:`stop`, with the same
        ports and data.

        Raises:
            EtcdServerError: etcd exited or did not become healthy in time (with its log).
        """
        if self.running:
            return self
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="nixl-etcd-", dir=self._data_parent))
            self._log = self._root / "etcd.log"
        fresh = not (self._root / "data").exists()
        picks = fresh and (self._pick_client or self._pick_peer)
        attempts = _PORT_ATTEMPTS if picks else 1
        for attempt in range(attempts):
            if picks:
                if self._pick_client:
                    self._client_port = _free_port(self.host)
                if self._pick_peer:
                    self._peer_port = _free_port(self.host)
                    while self._peer_port == self._client_port:
                        self._peer_port = _free_port(self.host)
            try:
                self._spawn()
                return self
            except EtcdServerError as exc:
                if "address already in use" not in str(exc) or attempt + 1 == attempts:
                    raise
                shutil.rmtree(self._root / "data", ignore_errors=True)
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn(self) -> None:
        assert self._root is not None and self._log is not None
        client = f"http://{self._bracketed}:{self._client_port}"
        peer = f"http://{self._bracketed}:{self._peer_port}"
        cmd = [
            *self.cmd_prefix,
            self.binary,
            "--name",
            self.name,
            "--data-dir",
            str(self._root / "data"),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"{self.name}={peer}",
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            self.name,
            # a single member needs no slack: faster start, and leases as short as 1 s
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
            *self.extra_args,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(self._log, "ab") as log:
            log.write(f"--- {' '.join(cmd)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._proc = None
                raise EtcdServerError(f"etcd exited with status {rc} at start:\n{self.log_tail()}")
            if self._healthy(min(1.0, max(0.05, deadline - time.monotonic()))):
                return
            if time.monotonic() >= deadline:
                self._terminate()
                raise EtcdServerError(
                    f"etcd at {client} not healthy after {self.startup_timeout:g} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.02)

    def _healthy(self, timeout: float) -> bool:
        conn = http.client.HTTPConnection(self.host, self._client_port, timeout=timeout)
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                return False
            return bool(json.loads(body).get("health") in ("true", True))
        except (OSError, http.client.HTTPException, ValueError):
            return False
        finally:
            conn.close()

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of etcd's log (stdout and stderr)."""
        if self._log is None or not self._log.exists():
            return "(no log)"
        text = self._log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, grace: float = 5.0) -> None:
        """Stop etcd (SIGTERM, then SIGKILL after ``grace`` s); its data stays for a restart."""
        self._terminate(grace)

    def kill(self) -> None:
        """SIGKILL etcd (a crash); its data stays."""
        self._terminate(0.0)

    def _terminate(self, grace: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            if grace > 0:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(grace)
                    return
                except subprocess.TimeoutExpired:
                    pass
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        proc.wait()

    def close(self) -> None:
        """Stop etcd and remove its data directory. Idempotent."""
        self._terminate()
        root, self._root = self._root, None
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EtcdServer({self.url}, {state})"


class EtcdFixture:
    """What the ``nixl_etcd`` fixture gives a test: a running server and a namespace of its own.

    The server is shared by the whole session; each test gets a fresh namespace (so tests never
    see each other's keys), and at teardown the stores made by :meth:`store` are closed and
    every key under the namespace is deleted. A test that stops or restarts etcd must start an
    :class:`EtcdServer` of its own instead.

    Attributes:
        server: the session's :class:`EtcdServer`.
        namespace: this test's key namespace.
    """

    def __init__(self, server: EtcdServer, namespace: str) -> None:
        self.server = server
        self.namespace = namespace
        self._stores: list[EtcdStore] = []

    @property
    def endpoint(self) -> str:
        """``host:port`` of the server."""
        return self.server.endpoint

    @property
    def url(self) -> str:
        """``http://host:port`` of the server."""
        return self.server.url

    def store(self, *, ttl: float = 2.0, **kw: Any) -> EtcdStore:
        """An :class:`~nixl_core.discovery.etcd.EtcdStore` on this server and namespace, closed
        at teardown (``endpoints=``, ``namespace=``, ``timeout=`` may be given)."""
        from nixl_core.discovery.etcd import EtcdStore

        endpoints = kw.pop("endpoints", self.endpoint)
        kw.setdefault("namespace", self.namespace)
        store = EtcdStore(endpoints, ttl=ttl, **kw)
        self._stores.append(store)
        return store

    def close(self) -> None:
        """Close the stores made here, then delete every key under the namespace."""
        while self._stores:
            self._stores.pop().close()
        if self.server.running:
            delete_prefix(self.server, self.namespace)


def delete_prefix(server: EtcdServer, prefix: str, timeout: float = 5.0) -> None:
    """Delete every key starting with ``prefix`` from ``server`` (standard library only)."""
    import base64

    key = prefix.encode()
    end = key[:-1] + bytes([key[-1] + 1]) if key and key[-1] < 0xFF else b"\0"
    body = json.dumps(
        {"key": base64.b64encode(key).decode(), "range_end": base64.b64encode(end).decode()}
    )
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        conn.request(
            "POST", "/v3/kv/deleterange", body=body, headers={"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise EtcdServerError(f"etcd at {server.url}: deleting {prefix!r}: HTTP {resp.status}")
    finally:
        conn.close()
