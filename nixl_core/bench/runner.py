"""The coordinator's side: start an implementation's initiator and target, run every row.

For each implementation (ours first, then NIXL) the coordinator starts a target process and an
initiator process (``spawn``), hands the target's metadata and buffer address to the initiator,
then for each row: optionally poisons the destination blocks (``--check``), has the initiator time
the row, waits until the target received the row's notifications, optionally compares digests of
the source and destination blocks. Nothing waits forever: every call has a timeout, and a child
that does not answer in time is killed and reported.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from nixl_core._childproc import stop_process
from nixl_core.bench.engines import RowTimes
from nixl_core.bench.worker import ChildConfig, RowPlan, child_main

__all__ = ["BenchError", "Child", "ImplRun", "Setup", "run_impl"]

#: Seconds a child may take to start (interpreter, imports, agent, buffer fill, registration).
START_TIMEOUT = 120.0
#: Seconds the target may take to see a row's last notification after the row ended.
NOTIF_TIMEOUT = 30.0


class BenchError(Exception):
    """A failure reported to the user as one line (no traceback unless --verbose).

    Attributes:
        detail: the traceback of the child process, when the failure happened in one.
        kind: the exception type name raised in the child ("" otherwise).
        message: the child's exception message (else the whole message).
    """

    def __init__(self, msg: str, detail: str = "", kind: str = "", message: str = "") -> None:
        super().__init__(msg)
        self.detail = detail
        self.kind = kind
        self.message = message or msg


class Child:
    """One spawned initiator or target process and its pipe."""

    def __init__(self, cfg: ChildConfig) -> None:
        self.cfg = cfg
        ctx = multiprocessing.get_context("spawn")
        here, there = ctx.Pipe()
        self._conn = here
        self._proc = ctx.Process(
            target=child_main, args=(there, cfg), name=f"nixl-bench-{cfg.name}", daemon=True
        )
        self._proc.start()
        there.close()
        self._dead = False

    @property
    def what(self) -> str:
        """E.g. "nixl target"."""
        impl = {"ours": "nixl-py", "dd": "dd baseline"}.get(self.cfg.impl, self.cfg.impl)
        return f"{impl} {self.cfg.role}"

    def _recv(self, timeout: float, op: str) -> Any:
        try:
            ready = self._conn.poll(timeout)
        except (EOFError, OSError):
            ready = True
        if not ready:
            self.kill()
            raise BenchError(f"{self.what} did not answer {op!r} within {timeout:.0f} s (killed)")
        try:
            reply = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(5.0)
            code = self._proc.exitcode
            self._dead = True
            raise BenchError(f"{self.what} exited during {op!r} (exit code {code})") from None
        if reply[0] == "ok":
            return reply[1]
        _, kind, msg, tb = reply
        raise BenchError(f"{self.what}: {op} failed: {kind}: {msg}", tb, kind, msg)

    def ready(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """Wait for the child's first reply: its info (metadata, buffer address...)."""
        info: dict[str, Any] = self._recv(timeout, "start")
        return info

    def call(self, op: str, *args: Any, timeout: float = 60.0) -> Any:
        """Send a command and wait (bounded) for its answer."""
        if self._dead:
            raise BenchError(f"{self.what} is not running")
        try:
            self._conn.send((op, args))
        except (BrokenPipeError, OSError) as exc:
            self._dead = True
            raise BenchError(f"{self.what} is gone: {exc}") from exc
        return self._recv(timeout, op)

    def kill(self) -> None:
        """Stop the process now."""
        self._dead = True
        stop_process(self._proc)

    def close(self) -> None:
        """Ask the child to exit; kill it if it does not."""
        if not self._dead and self._proc.is_alive():
            with contextlib.suppress(BenchError):
                self.call("exit", timeout=15.0)
            self._proc.join(15.0)
        self.kill()
        self._conn.close()
        self._proc.close()


@attrs.frozen
class Setup:
    """How to start one implementation's processes.

    Attributes:
        impl: "ours", "nixl" or "dd" (the sequential baseline of a FILE target).
        engine: engine options (see :func:`nixl_core.bench.engines.make_engine`).
        init_mem, target_mem: memory types of the two sides ("FILE" target: no target process).
        init_dev, target_dev: GPU indices (VRAM), else 0.
        init_bytes, target_bytes: buffer (or file) sizes.
        file: (path, direct) of the FILE target.
        check: verify every row's data.
        target_idle_poll: seconds between an idle target's notification drains.
    """

    impl: str
    engine: dict[str, Any]
    init_mem: str
    target_mem: str
    init_dev: int
    target_dev: int
    init_bytes: int
    target_bytes: int
    file: tuple[str, bool] | None
    check: bool
    target_idle_poll: float = 0.02


@attrs.define
class ImplRun:
    """What one implementation produced: per-row timings (None where it failed) and its info."""

    times: list[RowTimes | None]
    info: dict[str, Any]
    error: str | None = None
    error_detail: str = ""
    check_failures: list[str] = attrs.field(factory=list)


def _timeout(plan: RowPlan, nbytes: int) -> float:
    # Generous: a wedged transfer is caught by the initiator's per-iteration timeout first.
    return 60.0 + (plan.iters + plan.warmup) * (nbytes / 50e6 + 0.05)


def run_impl(
    setup: Setup,
    rows: Sequence[tuple[RowPlan, int]],
    step: Callable[[str], None],
    label: Callable[[RowPlan, int], str],
) -> ImplRun:
    """Start the processes of ``setup.impl``, run ``rows`` ((plan, bytes per iteration) pairs).

    Raises:
        BenchError: a process failed to start or a row failed (the message names which).
    """
    tag = {"ours": "nb", "nixl": "nx"}.get(setup.impl, setup.impl)
    is_file = setup.target_mem == "FILE"
    target: Child | None = None
    init: Child | None = None
    run = ImplRun(times=[], info={})
    try:
        if not is_file:
            target = Child(
                ChildConfig(
                    impl=setup.impl,
                    role="target",
                    name=f"{tag}-target",
                    engine=setup.engine,
                    mem=setup.target_mem,
                    nbytes=setup.target_bytes,
                    dev=setup.target_dev,
                    idle_poll=setup.target_idle_poll,
                )
            )
        init = Child(
            ChildConfig(
                impl=setup.impl,
                role="initiator",
                name=f"{tag}-initiator",
                engine=setup.engine,
                mem=setup.init_mem,
                nbytes=setup.init_bytes,
                dev=setup.init_dev,
                file=setup.file,
            )
        )
        t_info = target.ready() if target is not None else None
        i_info = init.ready()
        run.info = {"initiator": i_info, "target": t_info}
        if target is not None and t_info is not None:
            init.call("connect", t_info)
        for plan, nbytes in rows:
            step(label(plan, nbytes))
            run.times.append(_run_row(setup, plan, nbytes, init, target, run))
        return run
    finally:
        for c in (init, target):
            if c is not None:
                c.close()


def _run_row(
    setup: Setup,
    plan: RowPlan,
    nbytes: int,
    init: Child,
    target: Child | None,
    run: ImplRun,
) -> RowTimes:
    is_file = target is None
    write = plan.op == "WRITE"
    # (process, slots, whether the slots are the FILE) of the destination and the source
    dst = (target or init, plan.remote.idx, is_file) if write else (init, plan.local.idx, False)
    src = (init, plan.local.idx, False) if write else (target or init, plan.remote.idx, is_file)
    block = plan.local.block
    if setup.check:
        dst[0].call("poison", block, dst[1], 1000 + plan.row, dst[2], timeout=300.0)
    times: RowTimes = init.call("run", plan, timeout=_timeout(plan, nbytes))
    if plan.notif is not None and target is not None:
        want = plan.warmup + plan.iters
        got = target.call("expect", plan.notif, want, NOTIF_TIMEOUT, timeout=NOTIF_TIMEOUT + 30)
        if got < want:
            raise BenchError(
                f"{target.what} received {got} of the {want} notifications of row {plan.row} "
                f"({plan.op} {block} B x {plan.local.idx.size}) within {NOTIF_TIMEOUT:.0f} s"
            )
    if setup.check:
        a = src[0].call("digest", block, src[1], src[2], timeout=300.0)
        b = dst[0].call("digest", block, dst[1], dst[2], timeout=300.0)
        if a != b:
            run.check_failures.append(
                f"{plan.op} {block} B x {plan.local.idx.size}: destination blocks differ from "
                "the source blocks"
            )
    return times
