"""The second process of the remote conformance tests: one agent driven over a pipe.

:class:`PeerProcess` starts :func:`peer_main` in a ``spawn`` child (a fresh interpreter, so no
state and no threads are inherited from the test process). The child creates an agent with the
same backend and parameters as the tests, then answers commands sent over a
:func:`multiprocessing.Pipe`: allocate and register a buffer filled with a known pattern, report
a digest of a region, wait for a notification and digest a buffer the moment it arrives, send
notifications, load or forget a remote agent, reset, exit.

Nothing here may hang a test run:

- every wait of the parent has a timeout; a peer that does not answer in time is killed and the
  call raises :class:`PeerError` (the next test gets a fresh peer);
- the child exits when the pipe closes (the parent died or closed it) or when no command came
  for ``idle_timeout`` seconds, and it is a daemon process of the parent.

This module must stay importable without pytest: the child imports it to find
:func:`peer_main`.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from nixl_core._childproc import answer_one, error_reply, stop_process

# Seeds of the byte patterns the tests write; distinct so a wrong copy cannot look right.
SRC_SEED, PEER_SEED, OTHER_SEED = 101, 202, 303

__all__ = ["PeerBuffer", "PeerError", "PeerProcess", "digest", "pattern", "peer_main", "to_host"]

#: Seconds the parent waits for one answer unless told otherwise.
CALL_TIMEOUT = 30.0
#: Seconds the parent waits for the child to start (interpreter + imports + agent creation).
START_TIMEOUT = 60.0
#: Seconds the child waits for a command before it exits on its own.
IDLE_TIMEOUT = 120.0
#: Poll interval of the child's and the parent's notification loops.
POLL_INTERVAL = 0.0005


def pattern(seed: int, nbytes: int) -> npt.NDArray[np.uint8]:
    """The reproducible byte pattern of a seed (the same in every process)."""
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def to_host(buf: Any) -> npt.NDArray[np.uint8]:
    """A host (numpy) uint8 copy or view of a numpy or cupy buffer."""
    if isinstance(buf, np.ndarray):
        return buf.view(np.uint8).reshape(-1)
    get = getattr(buf, "get", None)  # cupy
    if get is not None:
        return np.asarray(get()).view(np.uint8).reshape(-1)
    return np.asarray(buf).view(np.uint8).reshape(-1)


def digest(buf: Any) -> str:
    """blake2b hex digest of a buffer's bytes (numpy or cupy)."""
    host = np.ascontiguousarray(to_host(buf))
    return hashlib.blake2b(host.data).hexdigest()


def alloc(mem_type: str, nbytes: int) -> Any:
    """A zeroed uint8 buffer: numpy for DRAM, cupy for VRAM (ImportError when cupy is absent)."""
    if mem_type.upper() in ("DRAM", "CPU"):
        return np.zeros(nbytes, np.uint8)
    if mem_type.upper() in ("VRAM", "CUDA", "GPU"):
        import cupy

        return cupy.zeros(nbytes, cupy.uint8)
    raise ValueError(f"cannot allocate {mem_type} memory in a test buffer")


def fill(buf: Any, seed: int) -> None:
    """Overwrite a numpy or cupy uint8 buffer with :func:`pattern` of ``seed``."""
    data = pattern(seed, int(buf.size))
    if isinstance(buf, np.ndarray):
        buf[...] = data
    else:
        import cupy

        buf[...] = cupy.asarray(data)


class PeerError(RuntimeError):
    """The peer process failed a command, did not answer in time, or is gone.

    Attributes:
        type_name: the class name of the exception raised in the child, when there was one.
    """

    def __init__(self, msg: str, type_name: str | None = None) -> None:
        self.type_name = type_name
        super().__init__(msg)


@attrs.frozen
class PeerBuffer:
    """A buffer the peer allocated and registered: its id there, address, size and device."""

    id: int
    addr: int
    nbytes: int
    dev: int
    mem_type: str

    def desc(self, offset: int = 0, length: int | None = None) -> tuple[int, int, int]:
        """One ``(addr, len, dev)`` descriptor of a region of the buffer."""
        n = self.nbytes - offset if length is None else length
        return (self.addr + offset, n, self.dev)


# --------------------------------------------------------------------------- the child
class _Child:
    """The child's state; each ``cmd_*`` method is one command of the pipe protocol."""

    def __init__(self, name: str, backend: str, params: Mapping[str, Any]) -> None:
        from nixl_core.agent import Agent, AgentConfig

        self.agent = Agent(
            name, AgentConfig(backends=(backend,), backend_params={backend: dict(params)})
        )
        self.bufs: dict[int, tuple[Any, Any]] = {}
        self.pending: dict[str, list[bytes]] = {}
        self.next_id = 0

    def close(self) -> None:
        self.agent.close()
        self.bufs.clear()

    # ------------------------------------------------------------ notifications
    def _drain(self) -> None:
        for sender, msgs in self.agent.get_notifs().items():
            self.pending.setdefault(sender, []).extend(msgs)

    def _take(self, sender: str) -> list[bytes]:
        return self.pending.pop(sender, [])

    # ------------------------------------------------------------ commands
    def cmd_ping(self) -> str:
        return self.agent.name

    def cmd_metadata(self) -> bytes:
        return self.agent.metadata()

    def cmd_add_remote(self, md: bytes) -> str:
        return self.agent.add_remote(md)

    def cmd_remove_remote(self, name: str) -> None:
        self.agent.remove_remote(name)

    def cmd_alloc(self, mem_type: str, nbytes: int, seed: int | None) -> tuple[int, int, int, int]:
        buf = alloc(mem_type, nbytes)
        if seed is not None:
            fill(buf, seed)
        reg = self.agent.register(buf)
        addr, length, dev = reg[0]
        self.next_id += 1
        self.bufs[self.next_id] = (buf, reg)
        return self.next_id, addr, length, dev

    def cmd_free(self, buf_id: int) -> None:
        _, reg = self.bufs.pop(buf_id)
        self.agent.deregister(reg)

    def cmd_fill(self, buf_id: int, seed: int) -> None:
        fill(self.bufs[buf_id][0], seed)

    def cmd_digest(self, buf_id: int, offset: int, length: int | None) -> str:
        buf = self.bufs[buf_id][0]
        end = int(buf.size) if length is None else offset + length
        return digest(buf[offset:end])

    def cmd_wait_notif(
        self, sender: str, msg: bytes, buf_id: int | None, tail: int, timeout: float
    ) -> tuple[bool, str | None, str | None]:
        """Wait for ``msg`` from ``sender``; snapshot the buffer the moment it is seen.

        Returns whether it came, then the digests of the buffer's last ``tail`` bytes (copied
        first: a transfer still running writes them last) and of the whole buffer.
        """
        deadline = time.monotonic() + timeout
        while True:
            self._drain()
            got = self.pending.get(sender, [])
            if msg in got:
                got.remove(msg)
                if buf_id is None:
                    return True, None, None
                buf = self.bufs[buf_id][0]
                last = buf[int(buf.size) - tail :].copy()
                whole = buf.copy()
                return True, digest(last), digest(whole)
            if time.monotonic() > deadline:
                return False, None, None
            time.sleep(POLL_INTERVAL)

    def cmd_collect_notifs(self, sender: str, count: int, timeout: float) -> list[bytes]:
        """Messages from ``sender``: wait until ``count`` arrived or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while True:
            self._drain()
            if len(self.pending.get(sender, [])) >= count or time.monotonic() > deadline:
                return self._take(sender)
            time.sleep(POLL_INTERVAL)

    def cmd_get_notifs(self) -> dict[str, list[bytes]]:
        self._drain()
        out, self.pending = self.pending, {}
        return out

    def cmd_send_notifs(self, peer: str, msgs: Sequence[bytes]) -> None:
        for m in msgs:
            self.agent.send_notif(peer, m)

    def cmd_reset(self) -> None:
        """Deregister every buffer, forget every remote agent, drop pending notifications."""
        for buf_id in list(self.bufs):
            self.cmd_free(buf_id)
        for name in self.agent.remote_agents:
            self.agent.remove_remote(name)
        self.agent.get_notifs()
        self.pending.clear()


def peer_main(
    conn: Any, name: str, backend: str, params: Mapping[str, Any], idle_timeout: float
) -> None:
    """Entry point of the peer process: serve commands until exit, pipe close or idle timeout.

    Each request is ``(command, args)``; each reply is ``("ok", result)`` or
    ``("err", exception type name, message, traceback)``. The first reply (sent unasked) says
    whether the agent could be created.
    """
    try:
        child = _Child(name, backend, params)
    except BaseException as exc:
        conn.send(error_reply(exc))
        conn.close()
        return
    try:
        conn.send(("ok", name))
        while conn.poll(idle_timeout):
            if not answer_one(conn, child):
                break
    finally:
        child.close()
        conn.close()


# --------------------------------------------------------------------------- the parent
class PeerProcess:
    """Handle on a peer agent running in a ``spawn`` child process.

    Args:
        backend: backend name the child's agent is created with.
        params: that backend's parameters.
        name: the child agent's name (default: a unique one).
        call_timeout: seconds to wait for each answer.
        idle_timeout: the child exits after this many seconds without a command.
        start_timeout: seconds to wait for the child to start.

    Raises:
        PeerError: the child did not start in time or could not create its agent.
    """

    def __init__(
        self,
        backend: str,
        params: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
        call_timeout: float = CALL_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.name = name or f"nixl-peer-{uuid.uuid4().hex[:10]}"
        self.backend = backend
        self.params = dict(params or {})
        self.call_timeout = call_timeout
        self.idle_timeout = idle_timeout
        self.start_timeout = start_timeout
        self._spawn()

    def _spawn(self) -> None:
        self._outstanding: str | None = None
        self._broken = False
        ctx = multiprocessing.get_context("spawn")
        here, there = ctx.Pipe()
        self._conn = here
        self._proc = ctx.Process(
            target=peer_main,
            args=(there, self.name, self.backend, self.params, self.idle_timeout),
            name=f"nixl-testing-{self.name}",
            daemon=True,
        )
        self._proc.start()
        there.close()
        try:
            self._recv(self.start_timeout, "start")
        except BaseException:
            self.close()
            raise

    def restart(self) -> None:
        """Replace the child with a fresh one (same agent name, no buffers, no remotes)."""
        self.close()
        self._spawn()

    def __repr__(self) -> str:
        return f"PeerProcess({self.name!r}, {self.backend}, pid={self._proc.pid})"

    @property
    def alive(self) -> bool:
        """True while the child runs and answered every call so far."""
        return not self._broken and self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        """The child's process id."""
        return self._proc.pid

    # ------------------------------------------------------------ protocol
    def send(self, op: str, *args: Any) -> None:
        """Send a command without waiting for its answer (collect it with :meth:`result`)."""
        if self._broken:
            raise PeerError(f"{self!r} is not usable any more (an earlier call failed)")
        if self._outstanding is not None:
            raise PeerError(f"{self!r}: answer to {self._outstanding!r} not collected yet")
        try:
            self._conn.send((op, args))
        except (BrokenPipeError, OSError) as exc:
            self._broken = True
            raise PeerError(f"{self!r} is gone (exit code {self._proc.exitcode}): {exc}") from exc
        self._outstanding = op

    def result(self, timeout: float | None = None) -> Any:
        """The answer to the command sent last; kills the child if it does not come in time."""
        op = self._outstanding
        if op is None:
            raise PeerError(f"{self!r}: no command is waiting for an answer")
        self._outstanding = None
        return self._recv(self.call_timeout if timeout is None else timeout, op)

    def call(self, op: str, *args: Any, timeout: float | None = None) -> Any:
        """Send a command and wait (bounded) for its answer."""
        self.send(op, *args)
        return self.result(timeout)

    def _recv(self, timeout: float, what: str) -> Any:
        try:
            ready = self._conn.poll(timeout)
        except (EOFError, OSError):
            ready = True  # recv below reports it
        if not ready:
            self._broken = True
            self.kill()
            raise PeerError(f"{self!r} did not answer {what!r} within {timeout} s; killed it")
        try:
            reply = self._conn.recv()
        except (EOFError, OSError) as exc:
            self._broken = True
            self._proc.join(5.0)
            raise PeerError(
                f"{self!r} exited during {what!r} (exit code {self._proc.exitcode})"
            ) from exc
        if reply[0] == "ok":
            return reply[1]
        _, type_name, msg, tb = reply
        if what == "start":
            self._broken = True
        raise PeerError(f"peer {self.name!r}: {what} raised {type_name}: {msg}\n{tb}", type_name)

    # ------------------------------------------------------------ lifecycle
    def kill(self) -> None:
        """Stop the child now (terminate, then kill), bounded in time."""
        self._broken = True
        stop_process(self._proc)

    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to exit; kill it if it does not within ``timeout`` seconds."""
        if not self._broken and self._proc.is_alive():
            try:
                if self._outstanding is not None:
                    self.result(timeout)
                self.call("exit", timeout=timeout)
            except PeerError:
                pass
            self._proc.join(timeout)
        self.kill()
        self._conn.close()

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ commands
    def metadata(self) -> bytes:
        """The peer agent's full metadata."""
        return bytes(self.call("metadata"))

    def add_remote(self, md: bytes) -> str:
        """Load an agent's metadata in the peer; returns the agent's name."""
        return str(self.call("add_remote", md))

    def remove_remote(self, name: str) -> None:
        """Make the peer forget an agent."""
        self.call("remove_remote", name)

    def alloc(self, nbytes: int, seed: int | None = 0, mem_type: str = "DRAM") -> PeerBuffer:
        """Allocate and register a buffer in the peer, filled with ``pattern(seed)`` (or zeros)."""
        buf_id, addr, length, dev = self.call("alloc", mem_type, nbytes, seed)
        return PeerBuffer(buf_id, addr, length, dev, mem_type)

    def free(self, buf: PeerBuffer) -> None:
        """Deregister and free a peer buffer."""
        self.call("free", buf.id)

    def fill(self, buf: PeerBuffer, seed: int) -> None:
        """Overwrite a peer buffer with ``pattern(seed)``."""
        self.call("fill", buf.id, seed)

    def digest(self, buf: PeerBuffer, offset: int = 0, length: int | None = None) -> str:
        """The peer's :func:`digest` of a region of one of its buffers."""
        return str(self.call("digest", buf.id, offset, length))

    def get_notifs(self) -> dict[str, list[bytes]]:
        """The peer's notifications received so far (each handed over once)."""
        return dict(self.call("get_notifs"))

    def send_notifs(self, peer: str, msgs: Sequence[bytes]) -> None:
        """Make the peer send notifications to ``peer``, in order."""
        self.call("send_notifs", peer, list(msgs))

    def reset(self) -> None:
        """Deregister the peer's buffers, forget its remotes, drop its pending notifications."""
        self.call("reset")
