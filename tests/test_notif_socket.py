"""NotifSocket: the same-host notification channel LOOPBACK and NVLINK share."""

from __future__ import annotations

import socket
import threading

import pytest

from nixl_core.errors import RemoteDisconnectError
from nixl_core.notif_socket import NotifSocket


def test_messages_arrive_in_order_and_malformed_datagrams_are_dropped() -> None:
    a, b = NotifSocket("TEST", "a"), NotifSocket("TEST", "b")
    a.start()
    b.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as raw:
            raw.sendto(b"\x05", b.addr)  # shorter than its length field
            raw.sendto(b"\xff\x00ab", b.addr)  # names more bytes than it carries
        for i in range(300):  # more than the kernel queues: the receive thread drains
            a.send("b", b.addr, b"m%d" % i)
        b.send("b", b"", b"own")
        got = b.take()
        assert got[0] == ("b", b"own")
        assert got[1:] == [("a", b"m%d" % i) for i in range(300)]
        assert b.take() == []
    finally:
        a.close()
        b.close()


def test_extra_sockets_are_served_by_the_receive_thread() -> None:
    n = NotifSocket("TEST", "srv")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(n.addr + b"-x")
    listener.listen(4)
    listener.setblocking(False)
    served: list[str] = []

    def serve() -> None:
        conn, _ = listener.accept()
        served.append(threading.current_thread().name)
        with conn:
            conn.sendall(b"ok")

    n.start([(listener, serve)])
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(5.0)
            c.connect(n.addr + b"-x")
            assert c.recv(2) == b"ok"
        assert served == ["nixl-test-rx-srv"]
    finally:
        n.close()
        listener.close()


def test_a_gone_peer_is_a_remote_disconnect_naming_it() -> None:
    a, gone = NotifSocket("TEST", "a"), NotifSocket("TEST", "gone")
    addr = gone.addr
    gone.close()
    try:
        with pytest.raises(RemoteDisconnectError, match="notification to 'gone' failed"):
            a.send("gone", addr, b"x")
    finally:
        a.close()
