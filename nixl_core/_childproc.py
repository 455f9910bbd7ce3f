"""Helpers shared by the processes nixl-py starts (benchmark workers, test peers).

Both serve commands over a multiprocessing pipe: the parent sends ``(op, args)``, the child
calls its ``cmd_<op>`` method and answers ``("ok", result)`` or an error reply.
"""

from __future__ import annotations

import traceback
from typing import Any

__all__ = ["answer_one", "error_reply", "stop_process"]


def error_reply(exc: BaseException) -> tuple[str, str, str, str]:
    """The pipe answer for an exception: ("err", type name, message, traceback)."""
    return ("err", type(exc).__name__, str(exc), traceback.format_exc())


def answer_one(conn: Any, child: Any) -> bool:
    """Receive one command and answer it; False when the loop must end (exit or pipe gone)."""
    try:
        op, args = conn.recv()
    except (EOFError, OSError):
        return False  # the parent closed the pipe or died
    if op == "exit":
        conn.send(("ok", None))
        return False
    try:
        reply: tuple[Any, ...] = ("ok", getattr(child, "cmd_" + op)(*args))
    except Exception as exc:
        reply = error_reply(exc)
    try:
        conn.send(reply)
    except (BrokenPipeError, OSError):
        return False
    return True


def stop_process(proc: Any, grace: float = 5.0) -> None:
    """Terminate a multiprocessing process, then kill it if it outlives ``grace`` seconds."""
    if proc.is_alive():
        proc.terminate()
        proc.join(grace)
    if proc.is_alive():
        proc.kill()
        proc.join(grace)
