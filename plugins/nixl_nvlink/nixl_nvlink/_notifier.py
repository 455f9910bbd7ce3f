"""The notifier: a posted transfer's notification leaves once its data is in place.

A request posted with a notification waits here until its CUDA event has completed; then the
notification is sent, once, by whichever comes first: ``poll`` seeing the event done (it calls
:meth:`Notifier.flush`), or the notifier thread, which checks the pending requests every 200 us
while there are any (so a notification arrives even when nobody polls).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from nixl_core.errors import NixlError
from nixl_nvlink._tables import Request

__all__ = ["Notifier"]


class Notifier:
    """Posted requests whose notification waits for their event, and the thread that sends it.

    Args:
        agent_name: the owning agent (names the thread).
        done: whether a request's event completed (sets ``req.error`` on a CUDA fault).
        send: sends one notification to a peer (the backend's ``send_notif``).
    """

    def __init__(
        self,
        agent_name: str,
        done: Callable[[Request], bool],
        send: Callable[[str, bytes], None],
    ) -> None:
        self._done = done
        self._send = send
        self._nlock = threading.Condition()
        self._pending: dict[int, Request] = {}
        self._closed = False
        self._thread = threading.Thread(
            target=self._notify_loop, name=f"nixl-nvlink-notif-{agent_name}", daemon=True
        )
        self._thread.start()

    def add(self, req: Request, notif: bytes) -> None:
        """Send ``notif`` for a request just posted, once its event has completed."""
        with self._nlock:
            req.notif = bytes(notif)
            self._pending[id(req)] = req
            self._nlock.notify()

    def flush(self, req: Request) -> None:
        """Send the request's notification (once), now that its data is in place; a failed send
        becomes the request's error."""
        with self._nlock:
            self._pending.pop(id(req), None)
            msg, req.notif = req.notif, None
            if msg is None or req.error is not None:
                return
            try:
                self._send(req.peer, msg)
            except NixlError as exc:
                req.error = exc

    def close(self) -> None:
        """Stop the thread (pending notifications are not sent)."""
        with self._nlock:
            self._closed = True
            self._nlock.notify_all()
        self._thread.join(timeout=5.0)

    def _notify_loop(self) -> None:
        while True:
            with self._nlock:
                while not self._pending and not self._closed:
                    self._nlock.wait()
                if self._closed:
                    return
                reqs = list(self._pending.values())
            for req in reqs:
                if self._done(req):
                    self.flush(req)
            time.sleep(2e-4)
