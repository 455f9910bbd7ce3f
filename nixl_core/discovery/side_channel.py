"""The socket side channel: NIXL's listener thread and the client connections to peers' ones.

On the wire every message is a u64 little-endian length ``L`` followed by ``L`` bytes of one
sealed frame (:mod:`nixl_core.discovery.sealed`). NIXL's three commands map to frame kinds:
LOAD (load my metadata), SEND (reply with yours: a LOAD, or a NACK with the reason) and INVL
(forget me).

:class:`Listener` serves them on one thread with non-blocking sockets, so no peer can hold it:

- it binds ``127.0.0.1`` unless another address is given explicitly; port 0 picks a free port
  and logs ``MD listener is listening on port N`` at INFO (NIXL's line, which scripts read);
- a declared length above ``max_frame`` closes the connection before anything is buffered;
- a frame must arrive whole within ``frame_timeout`` s of its first byte (a new connection's
  first frame: of the connect), and a reply be taken by the peer within ``frame_timeout`` s
  (slow-loris peers are cut off); an idle connection (one that sent a frame, between frames)
  is kept ``idle_timeout`` s, for peers' caches;
- frames of one connection are handled one at a time: while its reply waits to be sent,
  nothing more is read from it (a peer pipelining requests without reading holds one reply),
  and a few at a time before the other connections get their turn (none can hold the loop);
- at most ``max_conns`` connections at once, and at most ``budget`` bytes buffered over all of
  them, frames coming in and replies going out. At the connection limit a new connection
  evicts the one whose frame has been pending longest (refused only when all are idle); when
  the budget is used up the connections holding the most are cut (the one reading, if it
  would hold the most). So stalled or bulky peers cannot lock small requests out, and memory
  stays bounded by ``budget`` plus one frame being handled, whatever peers send;
- a frame that does not open (malformed, bad or missing HMAC tag) is dropped and logged — never
  handed on — and its connection closed. Log lines about bad peers are rate limited.

:class:`Channel` is the client side: one cached connection per (host, port), checked before
each use and re-opened when the peer closed it (the peer restarted), with a bounded timeout on
every connect, send and reply.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable

from nixl_core.discovery.sealed import Frame, Kind, open_frame
from nixl_core.errors import InvalidParamError, MetadataError, NixlError, RemoteDisconnectError

__all__ = ["DEFAULT_MAX_FRAME", "Channel", "Listener"]

logger = logging.getLogger(__name__)

_LEN = struct.Struct("<Q")
#: Frames of one connection handled before the others get their turn.
_TURN = 16
#: Largest frame accepted by default (64 MiB: the metadata of ~500k registrations).
DEFAULT_MAX_FRAME = 64 << 20

#: Answers a frame from a peer; returns the reply (a sealed frame) or None.
Handler = Callable[[Frame, tuple[str, int]], bytes | None]


class _Conn:
    __slots__ = ("addr", "buf", "need", "out", "sock", "started", "touched")

    def __init__(self, sock: socket.socket, addr: tuple[str, int], now: float) -> None:
        self.sock = sock
        self.addr = addr
        self.buf = bytearray()
        self.need = 0  # frame length once the 8-byte prefix is in, else 0
        self.out = bytearray()
        self.started = 0.0  # when the current frame's first byte came (0: between frames)
        self.touched = now


class _RateLimit:
    """Logs the first ``burst`` events, then one in every ``every`` with a count."""

    def __init__(self, burst: int = 10, every: int = 1000) -> None:
        self.n = 0
        self.burst, self.every = burst, every

    def __call__(self, msg: str, *args: object) -> None:
        self.n += 1
        if self.n <= self.burst or self.n % self.every == 0:
            logger.warning(msg + " (%d such events so far)", *args, self.n)


class Listener:
    """A thread serving NIXL's side-channel commands (see the module docstring).

    Args:
        handler: called on the listener thread for each frame that opens; it must not block
            (the metadata service hands loads to its workers).
        host: address to bind ("127.0.0.1" by default; "0.0.0.0" or "::" only when asked).
        port: port to bind; 0 picks a free one (:attr:`port` tells which).
        key: HMAC key every frame must be tagged with, or None.

    Raises:
        InvalidParamError: the address cannot be bound (names it and why).
    """

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        key: bytes | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_conns: int = 256,
        budget: int | None = None,
        frame_timeout: float = 10.0,
        idle_timeout: float = 600.0,
        name: str = "",
    ) -> None:
        self._handler = handler
        self._key = key
        self.max_frame = max_frame
        self.max_conns = max_conns
        self.budget = budget if budget is not None else 4 * max_frame
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        srv = socket.socket(family, socket.SOCK_STREAM)
        try:
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind((host, port))
            srv.listen(128)
        except OSError as exc:
            srv.close()
            raise InvalidParamError(
                f"metadata listener cannot bind {host}:{port}: {exc.strerror or exc}"
            ) from None
        srv.setblocking(False)
        self._srv = srv
        self.host = host
        self.port: int = srv.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(srv, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._conns: dict[socket.socket, _Conn] = {}
        self._ready: set[_Conn] = set()  # connections with frames left after their turn
        self._buffered = 0
        self._stop = False
        self._bad = _RateLimit()
        #: Counters for tests and ``md`` diagnostics: frames served, refused, connections cut.
        self.stats = {"frames": 0, "refused": 0, "cut": 0}
        self._thread = threading.Thread(
            target=self._run, name=f"nixl-md-listener-{name or self.port}", daemon=True
        )
        self._thread.start()
        level = logging.INFO if port == 0 else logging.DEBUG
        logger.log(level, "MD listener is listening on port %d", self.port)

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        try:
            while not self._stop:
                wait = 0.0 if self._ready else min(1.0, self.frame_timeout / 2)
                events = self._sel.select(timeout=wait)
                # Deadlines are judged as of this select: whatever had arrived by then is read
                # below, so a slow pass of the loop does not count against a peer.
                seen = time.monotonic()
                for sk, ev in events:
                    obj = sk.fileobj
                    if obj is self._srv:
                        self._accept()
                    elif obj is self._wake_r:
                        self._drain_wake()
                    else:
                        assert isinstance(obj, socket.socket)
                        conn = self._conns.get(obj)
                        if conn is None:
                            continue
                        if ev & selectors.EVENT_READ:
                            self._read(conn)
                        if ev & selectors.EVENT_WRITE and obj in self._conns:
                            self._write(conn)
                ready, self._ready = self._ready, set()
                for conn in ready:
                    if conn.sock in self._conns:
                        self._process(conn, time.monotonic())
                self._expire(seen)
        except Exception:  # the loop must not die silently
            logger.exception("metadata listener on port %d stopped", self.port)
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            self._sel.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self._srv.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: try again on the next event
                logger.warning("metadata listener cannot accept: %s", exc)
                return
            if len(self._conns) >= self.max_conns and not self._evict_oldest():
                self._bad(
                    "metadata listener: %d connections open; refusing %s", self.max_conns, addr[0]
                )
                self.stats["cut"] += 1
                sock.close()
                continue
            sock.setblocking(False)
            now = time.monotonic()
            conn = _Conn(sock, (str(addr[0]), int(addr[1])), now)
            conn.started = now  # its first frame is due within frame_timeout of the connect
            self._conns[sock] = conn
            self._sel.register(sock, selectors.EVENT_READ, None)

    def _evict_oldest(self) -> bool:
        """At ``max_conns``: cut the connection whose unfinished frame (or untaken reply) is the
        oldest, to let a new one in; False when every connection is idle (keep them)."""
        busy = [c for c in self._conns.values() if c.started]
        if not busy:
            return False
        oldest = min(busy, key=lambda c: c.started)
        self._cut(oldest, f"{self.max_conns} connections open and its frame is the oldest pending")
        return True

    def _make_room(self, conn: _Conn, n: int) -> bool:
        """Room in the budget for ``n`` more bytes of ``conn``: the connections holding the most
        are cut until it fits; False when ``conn`` would hold at least as much as any other."""
        mine = len(conn.buf) + len(conn.out) + n
        while self._buffered + n > self.budget:
            hog = max(self._conns.values(), key=lambda c: len(c.buf) + len(c.out))
            held = len(hog.buf) + len(hog.out)
            if held <= mine:
                return False
            self._cut(hog, f"the {self.budget}-byte buffer budget is used up; it holds {held}")
        return True

    def _close(self, conn: _Conn) -> None:
        if self._conns.pop(conn.sock, None) is None:
            return
        self._ready.discard(conn)
        self._buffered -= len(conn.buf) + len(conn.out)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        conn.sock.close()

    def _cut(self, conn: _Conn, why: str) -> None:
        self._bad("metadata listener: dropping %s:%d: %s", conn.addr[0], conn.addr[1], why)
        self.stats["cut"] += 1
        self._close(conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            if conn.buf:
                self._cut(conn, f"closed mid-frame ({len(conn.buf)} bytes buffered)")
            else:
                self._close(conn)
            return
        now = time.monotonic()
        conn.touched = now
        if not conn.started:
            conn.started = now
        if not self._make_room(conn, len(data)):
            self._cut(conn, f"the listener's {self.budget}-byte buffer budget is used up")
            return
        conn.buf += data
        self._buffered += len(data)
        self._process(conn, now)

    def _process(self, conn: _Conn, now: float) -> None:
        """Handle the complete frames buffered, one at a time: while a reply waits to be sent
        the next frame waits too (and nothing more is read), so a peer that does not read its
        replies holds at most one. At most ``_TURN`` frames per call: the rest wait for the
        next pass of the loop, after every other connection's turn."""
        for _ in range(_TURN):
            if conn.sock not in self._conns or conn.out:
                return
            if not conn.need:
                if len(conn.buf) < _LEN.size:
                    return
                (n,) = _LEN.unpack_from(conn.buf)
                if n == 0 or n > self.max_frame:
                    self._cut(conn, f"frame length {n} outside 1..{self.max_frame}")
                    return
                del conn.buf[: _LEN.size]
                self._buffered -= _LEN.size
                conn.need = n
            if len(conn.buf) < conn.need:
                return
            raw = bytes(conn.buf[: conn.need])
            del conn.buf[: conn.need]
            self._buffered -= conn.need
            conn.need = 0
            conn.started = now if conn.buf else 0.0
            self._frame(conn, raw)
        if conn.sock in self._conns and not conn.out:  # its turn is over, frames are left
            self._ready.add(conn)

    def _frame(self, conn: _Conn, raw: bytes) -> None:
        try:
            frame = open_frame(raw, self._key)
        except MetadataError as exc:
            self.stats["refused"] += 1
            self._cut(conn, f"refused frame: {exc}")
            return
        self.stats["frames"] += 1
        try:
            reply = self._handler(frame, conn.addr)
        except NixlError as exc:
            self.stats["refused"] += 1
            self._cut(conn, f"{frame.kind.name} not handled: {exc}")
            return
        except Exception:
            logger.exception(
                "metadata listener: handling %s from %s failed", frame.kind.name, conn.addr[0]
            )
            self._close(conn)
            return
        if reply is not None:
            out = _LEN.pack(len(reply)) + reply
            if not self._make_room(conn, len(out)):
                self._cut(conn, f"no room for a {len(out)}-byte reply in the buffer budget")
                return
            conn.out += out
            self._buffered += len(out)
            self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        """Send what the reply has left; while some is left, wait for the socket to be
        writable instead of reading (the reply must be taken within ``frame_timeout``)."""
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        del conn.out[:sent]
        self._buffered -= sent
        now = time.monotonic()
        if sent:
            conn.touched = now
        if conn.out:
            if not conn.started:
                conn.started = now
            self._sel.modify(conn.sock, selectors.EVENT_WRITE, None)
        else:
            if not conn.buf:
                conn.started = 0.0
            self._sel.modify(conn.sock, selectors.EVENT_READ, None)

    def _write(self, conn: _Conn) -> None:
        self._flush(conn)
        if not conn.out and conn.sock in self._conns:
            self._process(conn, time.monotonic())  # frames that waited for the reply

    def _expire(self, now: float) -> None:
        for conn in list(self._conns.values()):
            if conn in self._ready:
                continue  # its frames are in, waiting for their turn
            if conn.started and now - conn.started > self.frame_timeout:
                what = "a reply not taken" if conn.out else "a frame not complete"
                self._cut(conn, f"{what} after {self.frame_timeout} s")
            elif now - conn.touched > self.idle_timeout:
                self._close(conn)

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._conns)

    @property
    def buffered(self) -> int:
        """Bytes buffered now over all connections (frames coming in, replies going out)."""
        return self._buffered

    def close(self) -> None:
        """Stop the thread and close every connection (idempotent, bounded)."""
        if self._stop:
            return
        self._stop = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout=5.0)
        self._srv.close()
        self._wake_r.close()
        self._wake_w.close()


def _recv_exact(sock: socket.socket, n: int, deadline: float, what: str) -> bytes:
    out = bytearray()
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete {what} within the timeout")
        sock.settimeout(left)
        chunk = sock.recv(min(n - len(out), 1 << 20))
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, f"peer closed during {what}")
        out += chunk
    return bytes(out)


class Channel:
    """Client connections to peers' listeners, one per (host, port), re-opened when stale.

    Args:
        key: HMAC key for replies (frames sent are sealed by the caller).
        max_frame: largest reply accepted.
        timeout: default seconds for a connect, a send or a reply.
    """

    def __init__(
        self, key: bytes | None, max_frame: int = DEFAULT_MAX_FRAME, timeout: float = 5.0
    ) -> None:
        self._key = key
        self.max_frame = max_frame
        self.timeout = timeout
        self._lock = threading.Lock()
        self._socks: dict[tuple[str, int], socket.socket] = {}
        self._locks: dict[tuple[str, int], threading.Lock] = {}
        #: Connections opened so far (a re-open after a peer restart counts).
        self.opened = 0

    def _addr_lock(self, addr: tuple[str, int]) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(addr, threading.Lock())

    def _socket(self, addr: tuple[str, int], deadline: float) -> socket.socket:
        sock = self._socks.get(addr)
        if sock is not None:
            # The listener never speaks unasked: a readable idle socket means EOF or reset.
            try:
                readable = select.select([sock], [], [], 0)[0]
            except (OSError, ValueError):
                readable = [sock]
            if not readable:
                return sock
            self._drop(addr)
        sock = socket.create_connection(addr, timeout=max(0.001, deadline - time.monotonic()))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socks[addr] = sock
        self.opened += 1
        return sock

    def _drop(self, addr: tuple[str, int]) -> None:
        sock = self._socks.pop(addr, None)
        if sock is not None:
            sock.close()

    def _exchange(
        self, addr: tuple[str, int], frame: bytes, reply: bool, timeout: float | None
    ) -> Frame | None:
        t = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        where = f"{addr[0]}:{addr[1]}"
        with self._addr_lock(addr):
            for attempt in (0, 1):
                reused = addr in self._socks
                try:
                    sock = self._socket(addr, deadline)
                    sock.settimeout(max(0.001, deadline - time.monotonic()))
                    sock.sendall(_LEN.pack(len(frame)) + frame)
                    if not reply:
                        return None
                    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size, deadline, "reply length"))
                    if n == 0 or n > self.max_frame:
                        self._drop(addr)
                        raise MetadataError(
                            f"the listener at {where} replied with a frame of {n} bytes "
                            f"(limit {self.max_frame})"
                        )
                    return open_frame(_recv_exact(sock, n, deadline, "reply"), self._key)
                except MetadataError:
                    self._drop(addr)
                    raise
                except TimeoutError:
                    self._drop(addr)
                    raise RemoteDisconnectError(
                        f"the metadata listener at {where} did not answer within {t} s"
                    ) from None
                except OSError as exc:
                    self._drop(addr)
                    if attempt == 0 and reused:
                        continue  # the cached connection was stale (peer restarted): re-open
                    raise RemoteDisconnectError(
                        f"cannot reach the metadata listener at {where}: {exc.strerror or exc}"
                    ) from None
        raise AssertionError("unreachable")

    def send(self, addr: tuple[str, int], frame: bytes, timeout: float | None = None) -> None:
        """Send one frame.

        Raises:
            RemoteDisconnectError: the listener cannot be reached within the timeout.
        """
        self._exchange(addr, frame, False, timeout)

    def request(self, addr: tuple[str, int], frame: bytes, timeout: float | None = None) -> Frame:
        """Send one frame and return the reply, opened.

        Raises:
            RemoteDisconnectError: no connection or no reply within the timeout.
            MetadataError: the reply does not open (malformed, bad tag).
        """
        out = self._exchange(addr, frame, True, timeout)
        assert out is not None
        return out

    def close(self) -> None:
        """Close every cached connection."""
        with self._lock:
            for addr in list(self._socks):
                self._drop(addr)


def expect(frame: Frame, kind: Kind, where: str) -> bytes:
    """The payload of a reply of ``kind``; a NACK or another kind raises MetadataError."""
    if frame.kind is Kind.NACK:
        raise MetadataError(f"{where} refused: {frame.payload.decode(errors='replace')}")
    if frame.kind is not kind:
        raise MetadataError(f"{where} replied {frame.kind.name}, expected {kind.name}")
    return frame.payload
