"""The initiator and target processes: one agent each, driven by the coordinator over a pipe.

:func:`child_main` runs in a ``spawn`` child (a fresh interpreter: nothing of the coordinator's
state or threads is inherited, and NIXL's environment is set before it is imported). It creates
the engine, allocates and fills its buffer, registers it, and answers with its metadata; then it
serves commands until ``exit`` or until the pipe closes (the coordinator died).

- The **target** is passive: between commands it drains notifications (``--target-seg``
  DRAM/VRAM), and ``expect`` waits until a row's notifications all arrived.
- The **initiator** loads the target's metadata (``connect``) and times rows (``run``). With a
  FILE target there is no target process: the initiator registers the file and its transfers are
  loopback (peer = its own name), as storage transfers are in NIXL.

Replies are ``("ok", value)`` or ``("err", type name, message, traceback)``.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from typing import Any

import attrs

from nixl_core._childproc import answer_one, error_reply
from nixl_core.bench.engines import Engine, RowSpec, make_engine, run_row
from nixl_core.bench.workload import (
    SideLayout,
    alloc_buffer,
    buffer_addr,
    digest_file_slots,
    digest_slots,
    fill_pattern,
    poison_file_slots,
    poison_slots,
)

__all__ = ["ChildConfig", "RowPlan", "child_main"]

#: Fill seeds of the two sides' buffers (distinct: a copy from the wrong side cannot look right).
INITIATOR_SEED, TARGET_SEED = 0xBB, 0xAA
#: Id of the benchmark file in our FILE descriptors (path-mode registration).
FILE_ID = 7


@attrs.frozen
class ChildConfig:
    """What a child needs to set itself up.

    Attributes:
        impl: "ours" or "nixl".
        role: "initiator" or "target".
        name: agent name.
        engine: engine options (backend, nixl_backend, nixl_progress_thread).
        mem: this side's memory type ("DRAM" or "VRAM").
        nbytes: buffer size.
        dev: GPU index for VRAM, else 0.
        file: (path, direct) when the initiator also owns the FILE target (a file the
            coordinator created and filled).
        idle_poll: seconds between notification drains of an idle target.
    """

    impl: str
    role: str
    name: str
    engine: dict[str, Any]
    mem: str
    nbytes: int
    dev: int
    file: tuple[str, bool] | None = None
    idle_poll: float = 0.02


@attrs.frozen
class RowPlan:
    """A row as the coordinator sends it; the initiator completes it into a :class:`RowSpec`."""

    row: int
    op: str
    local: SideLayout
    remote: SideLayout
    iters: int
    warmup: int
    prepared: bool
    recreate: bool
    notif: bytes | None
    timeout: float


class _Child:
    def __init__(self, cfg: ChildConfig) -> None:
        self.cfg = cfg
        self.engine: Engine = make_engine(cfg.impl, cfg.name, cfg.engine)
        self.buf = alloc_buffer(cfg.mem, cfg.nbytes, cfg.dev)
        fill_pattern(self.buf, INITIATOR_SEED if cfg.role == "initiator" else TARGET_SEED)
        self.addr = buffer_addr(self.buf)
        self.engine.register_memory(cfg.mem, self.addr, cfg.nbytes, cfg.dev)
        self.file_dev = 0
        if cfg.file is not None:
            path, direct = cfg.file
            self.file_dev = self.engine.register_file(path, FILE_ID, direct)
        self.peer: dict[str, Any] | None = None
        self.notifs: Counter[bytes] = Counter()

    def info(self) -> dict[str, Any]:
        md = self.engine.metadata() if self.cfg.role == "target" else b""
        backend = getattr(self.engine, "backend", "")
        return {
            "name": self.cfg.name,
            "pid": os.getpid(),
            "metadata": md,
            "addr": self.addr,
            "nbytes": self.cfg.nbytes,
            "dev": self.cfg.dev,
            "mem": self.cfg.mem,
            "backend": backend,
        }

    # ------------------------------------------------------------ commands
    def cmd_connect(self, peer: dict[str, Any]) -> str:
        name = self.engine.add_remote(peer["metadata"])
        self.peer = dict(peer, name=name)
        return name

    def cmd_run(self, plan: RowPlan) -> Any:
        if self.cfg.file is not None:
            peer, rmem, rbase, rdev = self.cfg.name, "FILE", 0, self.file_dev
        else:
            if self.peer is None:
                raise RuntimeError("run before connect")
            peer, rmem = self.peer["name"], self.peer["mem"]
            rbase, rdev = self.peer["addr"], self.peer["dev"]
        spec = RowSpec(
            row=plan.row,
            op=plan.op,
            local=plan.local,
            remote=plan.remote,
            local_mem=self.cfg.mem,
            remote_mem=rmem,
            local_base=self.addr,
            remote_base=rbase,
            local_dev=self.cfg.dev,
            remote_dev=rdev,
            peer=peer,
            iters=plan.iters,
            warmup=plan.warmup,
            prepared=plan.prepared,
            recreate=plan.recreate,
            notif=plan.notif,
            timeout=plan.timeout,
        )
        return run_row(self.engine, spec)

    def drain(self) -> None:
        self.notifs.update(self.engine.drain_notifs())

    def cmd_expect(self, tag: bytes, count: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            if self.notifs[tag] >= count or time.monotonic() > deadline:
                return self.notifs.pop(tag, 0)
            time.sleep(0.0005)

    def cmd_poison(self, block: int, slots: Any, seed: int, file: bool) -> None:
        if file:
            assert self.cfg.file is not None
            poison_file_slots(self.cfg.file[0], block, slots, seed)
        else:
            poison_slots(self.buf, block, slots, seed)

    def cmd_digest(self, block: int, slots: Any, file: bool) -> str:
        if file:
            assert self.cfg.file is not None
            return digest_file_slots(self.cfg.file[0], block, slots)
        return digest_slots(self.buf, block, slots)

    def close(self) -> None:
        self.engine.close()


def child_main(conn: Any, cfg: ChildConfig) -> None:
    """Entry point of an initiator or target process (never returns: ``os._exit``)."""
    try:
        _serve(conn, cfg)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # NIXL's and UCX's threads must not keep a finished child alive.
        os._exit(0)


def _serve(conn: Any, cfg: ChildConfig) -> None:
    try:
        child = _Child(cfg)
        conn.send(("ok", child.info()))
    except BaseException as exc:
        try:
            conn.send(error_reply(exc))
        finally:
            conn.close()
        return
    try:
        while True:
            try:
                ready = conn.poll(cfg.idle_poll)
            except (EOFError, OSError):
                break
            if not ready:
                if cfg.role == "target":
                    child.drain()
                continue
            if not answer_one(conn, child):
                break
    finally:
        try:
            child.close()
        finally:
            conn.close()
