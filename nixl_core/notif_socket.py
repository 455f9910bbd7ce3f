"""Same-host notifications for backends: one abstract Unix datagram socket per backend instance.

A backend whose peers live on the same host (LOOPBACK, NVLINK) puts :attr:`NotifSocket.addr` in
its connection info; a peer sends to that address. A datagram is ``u16 name length | sender
name | message``. A receive thread drains the socket as datagrams arrive: the kernel queues only
a few (``net.unix.max_dgram_qlen``), and a sender must not block because the receiving agent's
user has not called ``get_notifs()`` yet. :meth:`NotifSocket.take` drains too; both drain under
one lock, so the messages of one sender stay in order.
"""

from __future__ import annotations

import collections
import os
import select
import socket
import struct
import threading
import uuid
from collections.abc import Callable, Sequence

from nixl_core.errors import RemoteDisconnectError, TransferError

__all__ = ["NotifSocket"]


class NotifSocket:
    """The receiving socket, the inbox it fills, and the sending side of one backend instance.

    Args:
        backend: the backend's name (in the address and in errors).
        agent_name: the owning agent (the sender name of every datagram it sends).
    """

    def __init__(self, backend: str, agent_name: str) -> None:
        self.backend = backend
        self.agent_name = agent_name
        #: Abstract socket address (no file to clean up); peers send here.
        self.addr = f"\0nixl-{backend.lower()}-".encode() + uuid.uuid4().hex.encode()
        self._name = agent_name.encode()
        self._rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._rx.bind(self.addr)
        self._rx.setblocking(False)
        self._tx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._tx.settimeout(5.0)
        self._tx_lock = threading.Lock()
        self._own: collections.deque[tuple[str, bytes]] = collections.deque()
        self._inbox: collections.deque[tuple[str, bytes]] = collections.deque()
        self._rx_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self, extra: Sequence[tuple[socket.socket, Callable[[], None]]] = ()) -> None:
        """Start the receive thread; it also calls ``handler`` whenever ``sock`` of a pair in
        ``extra`` is readable (a backend's own listening socket, served from the same thread)."""
        self._thread = threading.Thread(
            target=self._receive,
            args=(tuple(extra),),
            name=f"nixl-{self.backend.lower()}-rx-{self.agent_name}",
            daemon=True,
        )
        self._thread.start()

    def send(self, peer: str, addr: bytes, msg: bytes) -> None:
        """Send ``msg`` to ``peer``'s socket at ``addr``; to the own agent it is queued directly.

        Raises:
            RemoteDisconnectError: the peer's socket is gone (its agent ended).
            TransferError: any other send failure (e.g. its queue stayed full for 5 s).
        """
        if peer == self.agent_name:
            self._own.append((self.agent_name, bytes(msg)))
            return
        frame = struct.pack("<H", len(self._name)) + self._name + bytes(msg)
        try:
            with self._tx_lock:
                self._tx.sendto(frame, addr)
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            raise RemoteDisconnectError(
                f"notification to {peer!r} failed: its agent is gone ({exc})", backend=self.backend
            ) from exc
        except OSError as exc:
            raise TransferError(
                f"notification to {peer!r} failed: {exc}", backend=self.backend
            ) from exc

    def take(self) -> list[tuple[str, bytes]]:
        """Every (sender, message) received since the last call, in arrival order."""
        out: list[tuple[str, bytes]] = []
        while self._own:
            out.append(self._own.popleft())
        with self._rx_lock:
            self._drain()
            while self._inbox:
                out.append(self._inbox.popleft())
        return out

    def _drain(self) -> None:
        """Move every queued datagram into the inbox (caller holds ``_rx_lock``)."""
        while True:
            try:
                frame = self._rx.recv(1 << 20)
            except OSError:  # BlockingIOError included: nothing more queued
                return
            if len(frame) < 2:
                continue
            (n,) = struct.unpack_from("<H", frame)
            if 2 + n > len(frame):
                continue  # malformed datagram: not from a peer backend
            self._inbox.append((frame[2 : 2 + n].decode("utf-8", "replace"), frame[2 + n :]))

    def _receive(self, extra: tuple[tuple[socket.socket, Callable[[], None]], ...]) -> None:
        poller = select.poll()
        poller.register(self._rx, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        handlers = {s.fileno(): h for s, h in extra}
        for fd in handlers:
            poller.register(fd, select.POLLIN)
        while True:
            events = poller.poll()
            if any(fd == self._wake_r for fd, _ in events):
                return  # close() asked to stop
            for fd, _ in events:
                handler = handlers.get(fd)
                if handler is not None:
                    handler()
            with self._rx_lock:
                self._drain()

    def close(self) -> None:
        """Stop the receive thread (extra sockets are no longer served) and close the sockets."""
        if self._closed:
            return
        self._closed = True
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._rx.close()
        self._tx.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
