"""The backend (south-bound) contract every transport plugin implements.

A third party can implement a backend from this module alone. The core owns semantics
(registration bookkeeping, descriptor checks, metadata, backend choice, the request state
machine, notification routing, telemetry, errors); a backend owns bytes. The core validates
everything before a backend sees it, so backends never re-validate: they receive numpy arrays
and the per-descriptor registration handles already resolved.

**Declaring a backend.** Subclass :class:`Backend` and set the class attributes: ``name`` (upper
case, what users write), ``mem_types``, the capability flags, ``param_specs`` (the parameters,
see :mod:`nixl_core.params`) and ``api_version`` (the version of this contract the class was
written for: set it explicitly to :data:`PLUGIN_API_VERSION`, so that a core with an
incompatible contract refuses the plugin by name instead of failing inside it). Register the
class from the plugin's ``nixl_register_backends`` hook (:mod:`nixl_core.hookspecs`).
``probe()`` must never raise and must not change the process (no environment writes, no native
library loads that have side effects, no CUDA context): it says whether the backend can run
here and, if not, why; :class:`Availability` ``notes`` name anything the constructor will do to
the process (shown by ``python -m nixl_core backends``).

**Lifecycle** of an instance (one per type per agent)::

    b = Backend(agent_name, params)          # params: ResolvedParams, typed; may load native code
    handles = b.register(mem_type, rows, metas)
    blob = b.public_data(handle)             # remote-capable backends: goes into metadata
    info = b.connection_info()               # remote-capable backends: goes into metadata
    b.load_remote_conn(peer, info); remote_handles = b.load_remote(peer, mem_type, rows, blobs)
    req = b.prepare(op, local_side, remote_side, peer)
    b.post(req, notif) -> DONE | IN_PROGRESS; b.poll(req) -> ...; b.release(req)
    b.deregister(handles); b.close()

**What arrives.**

- ``params``: a :class:`~nixl_core.params.ResolvedParams` mapping every declared parameter to its
  typed value, after the core applied precedence (explicit > AgentConfig > environment >
  default) and checked each value. Unknown names never reach the backend.
- ``register(mem_type, rows, metas)``: ``rows`` is a read-only C-contiguous ``(N, 3)`` uint64
  array ``[addr, len, dev]`` (N >= 1) of one memory type the backend declared; the core has
  checked that no row overlaps another registration of the agent. ``metas`` holds N bytes
  objects (``b""`` when the caller gave none; for FILE in path mode, e.g. ``b"rw:/data/f"``).
  Return one handle (any object) per row, in order.
- Transfers: :class:`XferSide` columns (see its docstring), already merged, with lengths equal
  on both sides and every descriptor inside a registration this backend holds.

**Errors.** Raise the classes of :mod:`nixl_core.errors` (``RegistrationError`` with ``index``
for a bad region, ``TransferError`` and its subclasses for a failed transfer, ``NotSupportedError``
for a capability the backend lacks). A method that fails must undo its own partial work first
(a ``register`` that mapped 3 of 5 regions unmaps them). The core passes ``NixlError`` subclasses
through unchanged; any other ``Exception`` escaping a backend method is turned into the typed
error of the operation (``RegistrationError``, ``TransferError``, ``PluginError``), naming the
backend and the item, chained from the original (:func:`~nixl_core.errors.foreign_error`), and
the core rolls back its own state (a failed registration leaves no row behind). A transfer
that fails after ``post`` returned is reported by ``poll`` returning ERROR with ``req.error``
set; the core then raises that error from ``check()`` / ``wait()``.

**Concurrency.** The core serializes, per agent, the memory and peer calls (``register``,
``deregister``, ``load_local``/``unload_local``, ``public_data``, ``connection_info``,
``load_remote_conn``, ``load_remote``, ``unload_remote``, ``connect``, ``disconnect``): they never
run concurrently with each other on one instance. Transfer calls (``prepare``,
``prepare_indexed``, ``prep_side``, ``release_side``, ``post``, ``post_stream``, ``poll``,
``block``, ``release``, ``completion_event``) may run concurrently from several user threads for
*different* requests, and concurrently with the memory calls; calls for one request are never
concurrent. ``get_notifs`` and ``send_notif`` may be called from any thread at any time.
``close`` is called once, after the core released every request, unloaded every peer and
deregistered every region; nothing is called after it.

Optional hooks (defaults keep the plain path):

- **Prepared-list state.** ``state = b.prep_side(whole_side, peer)`` is called once per
  (prepared list, backend), the first time ``make`` picks the backend for that list; the core
  caches the result on the list (dropped, through ``b.release_side(state)``, when the list is
  released or its registrations change). When both lists have state, ``make`` hands the
  backend the two states and the index arrays, ``b.prepare_indexed(op, l_state, l_idx,
  r_state, r_idx, peer)``, instead of gathered columns: a GPU backend keeps the columns
  resident on the device and gathers them there. ``prep_side`` returning None means "no
  state for this list": ``make`` then gathers on the host and calls ``prepare``.
- **CUDA stream order** (``supports_stream``): ``b.post_stream(req, notif, stream)`` starts the
  transfer after the work queued on the caller's stream, and ``b.completion_event(req)``
  gives an event that completes with the transfer. Users reach both through
  ``XferRequest.post(stream=...)`` and ``XferRequest.completion_event()`` only. Backends
  without the flag never see these calls: the core refuses them with
  :class:`~nixl_core.errors.NotSupportedError` naming the backend, before anything starts.

Capabilities are class attributes. ``supports_remote`` implies ``supports_notif`` (as in NIXL).
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import attrs
import numpy as np
import numpy.typing as npt

from nixl_core.errors import NotSupportedError
from nixl_core.memory import MemType
from nixl_core.params import Param, ResolvedParams, resolve_params

__all__ = [
    "PLUGIN_API_VERSION",
    "Availability",
    "Backend",
    "BackendRequest",
    "XferOp",
    "XferSide",
    "XferStatus",
]

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]

#: Version of this contract. Bumped when it changes incompatibly; the plugin loader refuses a
#: backend class whose ``api_version`` differs. Version 2: ``param_specs`` / typed
#: ``ResolvedParams``, ``completion_event(req)``, ``Availability.notes``.
PLUGIN_API_VERSION = 2


class XferOp(enum.Enum):
    """Transfer direction, seen from the initiator: WRITE pushes local -> remote, READ pulls."""

    READ = "READ"
    WRITE = "WRITE"

    @classmethod
    def parse(cls, value: XferOp | str) -> XferOp:
        """Accept an XferOp or its name.

        Raises:
            InvalidParamError: unknown op (names it).
        """
        if isinstance(value, XferOp):
            return value
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                pass
        from nixl_core.errors import InvalidParamError

        raise InvalidParamError(f"unknown transfer op {value!r}: expected 'READ' or 'WRITE'")


class XferStatus(enum.Enum):
    """State of a transfer request."""

    PENDING = "PENDING"  # made, never posted
    IN_PROGRESS = "IN_PROGRESS"
    DONE = "DONE"
    ERROR = "ERROR"


@attrs.frozen
class Availability:
    """What :meth:`Backend.probe` says: whether the backend can run here, and why not.

    Attributes:
        available: the backend can be created here.
        reason: why not (empty when available).
        notes: what creating the backend does to the process beyond its own objects (e.g.
            "sets PR_SET_PTRACER_ANY"), one line each; shown by ``python -m nixl_core backends``.
    """

    available: bool
    reason: str = ""
    notes: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.available


@attrs.frozen
class XferSide:
    """One side of a transfer as a backend receives it.

    The columns are 1-D arrays of one length N, already merged where contiguous; the two sides of
    a request share one ``lengths`` array (lengths are equal). ``addrs`` is always contiguous.
    A column whose values are all equal (``uniform_len``, ``uniform_dev``, ``single_slot`` >= 0)
    may be a read-only broadcast view with stride 0: that costs nothing to build, and numpy
    reads it like any array, but a backend that hands a column's buffer to native code must
    pass it through ``np.ascontiguousarray`` first (or use the uniform value).

    Attributes:
        mem_type: memory type of every descriptor.
        addrs: addresses (file offsets for FILE).
        lengths: lengths in bytes.
        devs: device ids (GPU index, fd, ...).
        reg_slots: (N,) int64, the slot of each descriptor's registration in its section (the
            initiator's registrations for the local side, the peer's for the remote side). Equal
            slots mean the same registration.
        slot_handles: slot -> this backend's handle for that registration: what
            :meth:`Backend.register` (local side), :meth:`Backend.load_remote` (remote side) or
            :meth:`Backend.load_local` (loopback) returned. Backends that need per-descriptor
            native keys map ``reg_slots`` through their own arrays, vectorized.
        uniform_len: the length of every descriptor, or -1 when they differ.
        uniform_dev: the device of every descriptor, or -1 when they differ.
        single_slot: the one registration slot of every descriptor, or -1.
    """

    mem_type: MemType
    addrs: U64
    lengths: U64
    devs: U64
    reg_slots: I64
    slot_handles: Mapping[int, Any]
    uniform_len: int = -1
    uniform_dev: int = -1
    single_slot: int = -1

    def __len__(self) -> int:
        return int(self.addrs.shape[0])

    @property
    def descs(self) -> U64:
        """The side as an (N, 3) [addr, len, dev] array (built on each access)."""
        return np.stack([self.addrs, self.lengths, self.devs], axis=1)

    def unique_handles(self) -> tuple[I64, list[Any]]:
        """(inverse index per descriptor, handles of the distinct registrations), vectorized."""
        if self.single_slot >= 0:
            return np.zeros(len(self), np.int64), [self.slot_handles[self.single_slot]]
        uniq, inverse = np.unique(self.reg_slots, return_inverse=True)
        return inverse.astype(np.int64), [self.slot_handles[int(s)] for s in uniq]


class BackendRequest:
    """Base of a backend's per-request state. Backends subclass it freely.

    Attributes:
        path: the transport that carried (or will carry) the data, e.g. ``"ucx:cma"``,
            ``"loopback:cma"``, ``"posix:pwritev"``; shown in telemetry and the benchmark.
        error: the exception that ended the request in ERROR, set by the backend.
    """

    path: str = ""
    error: BaseException | None = None


class Backend(abc.ABC):
    """Abstract transport backend. One instance per type per agent (module docstring: contract).

    Class attributes:
        name: backend type name as users write it (NIXL style, upper case: "UCX", "POSIX").
        mem_types: memory types it can register.
        supports_local: transfers within the agent (loopback, storage).
        supports_remote: transfers to other agents; implies supports_notif.
        supports_notif: can deliver notifications.
        supports_stream: :meth:`post_stream` and :meth:`completion_event` work (CUDA stream
            order without a host synchronize).
        param_specs: the parameters it accepts (:class:`~nixl_core.params.Param`).
        api_version: the contract version the class implements (:data:`PLUGIN_API_VERSION`).
        takes_indices: set automatically for subclasses overriding :meth:`prepare_indexed`.

    Attributes:
        agent_name: the owning agent's name.
        params: the resolved, typed parameters (read-only).
    """

    name: ClassVar[str]
    mem_types: ClassVar[frozenset[MemType]]
    supports_local: ClassVar[bool] = True
    supports_remote: ClassVar[bool] = False
    supports_notif: ClassVar[bool] = False
    supports_stream: ClassVar[bool] = False
    param_specs: ClassVar[tuple[Param, ...]] = ()
    api_version: ClassVar[int] = PLUGIN_API_VERSION
    takes_indices: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.takes_indices = cls.prepare_indexed is not Backend.prepare_indexed

    def __init__(self, agent_name: str, params: Mapping[str, Any] | None = None) -> None:
        """Keep the agent's name and the parameters.

        Args:
            agent_name: the owning agent.
            params: what :class:`~nixl_core.agent.Agent` resolved; anything else (a plain
                mapping, when a backend is built directly) is resolved here with the same
                precedence, as explicit values.

        Raises:
            InvalidParamError: an unknown parameter or a bad value.
        """
        self.agent_name = agent_name
        if not isinstance(params, ResolvedParams):
            params = resolve_params(self.name, self.param_specs, explicit=params or {})
        self.params: ResolvedParams = params

    @classmethod
    def probe(cls) -> Availability:
        """Whether this backend can run here. Never raises, never changes the process."""
        return Availability(True)

    @classmethod
    def capabilities(cls) -> dict[str, bool]:
        """The capability flags as a dict (for listings)."""
        return {
            "local": cls.supports_local,
            "remote": cls.supports_remote,
            "notif": cls.supports_notif,
        }

    @classmethod
    def param_defaults(cls) -> dict[str, str]:
        """Every parameter's default, as strings (NIXL's ``get_plugin_params`` shape)."""
        return {p.name: p.display for p in cls.param_specs}

    # ------------------------------------------------------------------ memory
    @abc.abstractmethod
    def register(self, mem_type: MemType, rows: U64, metas: Sequence[bytes]) -> list[Any]:
        """Register regions; return one private handle per row. Roll back all on failure."""

    @abc.abstractmethod
    def deregister(self, handles: Sequence[Any]) -> None:
        """Release handles returned by :meth:`register`."""

    def load_local(self, handle: Any) -> Any:
        """Target-side handle for a loopback transfer to the agent's own memory."""
        return handle

    def unload_local(self, handle: Any) -> None:  # noqa: B027  (optional hook, default no-op)
        """Free what :meth:`load_local` returned."""

    def public_data(self, handle: Any) -> bytes:
        """The registration's blob for remote agents (e.g. a packed rkey)."""
        raise NotSupportedError(f"backend {self.name} does not support remote agents")

    # ------------------------------------------------------------------ remote agents
    def connection_info(self) -> bytes:
        """This backend's connection info for remote agents (non-empty)."""
        raise NotSupportedError(f"backend {self.name} does not support remote agents")

    def load_remote_conn(self, peer: str, info: bytes) -> None:
        """Store a peer's connection info (connect lazily or now, without blocking)."""
        raise NotSupportedError(f"backend {self.name} does not support remote agents")

    def load_remote(
        self, peer: str, mem_type: MemType, rows: U64, blobs: Sequence[bytes]
    ) -> list[Any]:
        """Turn a peer's registration blobs into handles usable as a transfer's remote side."""
        raise NotSupportedError(f"backend {self.name} does not support remote agents")

    def unload_remote(self, peer: str, handles: Sequence[Any]) -> None:  # noqa: B027
        """Free handles returned by :meth:`load_remote`."""

    def connect(self, peer: str) -> None:  # noqa: B027  (optional: backends connect lazily)
        """Eagerly connect to a peer whose connection info was loaded."""

    def disconnect(self, peer: str) -> None:  # noqa: B027
        """Forget a peer: close its connections. Called when its metadata is removed."""

    # ------------------------------------------------------------------ transfers
    @abc.abstractmethod
    def prepare(self, op: XferOp, local: XferSide, remote: XferSide, peer: str) -> BackendRequest:
        """Build a request once; it may be posted many times."""

    def prep_side(self, side: XferSide, peer: str) -> Any:
        """Optional: state kept with a prepared list for :meth:`prepare_indexed` (default None).

        Called once per (prepared list, backend), the first time ``make`` picks this backend
        for the list; the result is cached on the list. Only backends that override
        :meth:`prepare_indexed` are asked.

        Args:
            side: the whole prepared list, unmerged, as :meth:`prepare` would see it
                (``slot_handles`` are this backend's handles for the list's registrations).
            peer: "" for the initiator's own memory, else the agent whose memory it is (this
                agent's own name for loopback).

        Returns:
            Any object (e.g. device-resident columns), or None to have ``make`` use the plain
            path (host gather + :meth:`prepare`) for requests made from this list.

        Raises:
            NixlError: the list can never be carried by this backend (e.g. memory it cannot
                map); ``make`` raises it.
        """
        return None

    def release_side(self, state: Any) -> None:  # noqa: B027  (optional hook, default no-op)
        """Free what :meth:`prep_side` returned (the list was released or went stale)."""

    def prepare_indexed(
        self,
        op: XferOp,
        local_state: Any,
        local_idx: npt.NDArray[np.integer[Any]],
        remote_state: Any,
        remote_idx: npt.NDArray[np.integer[Any]],
        peer: str,
    ) -> BackendRequest:
        """Optional: build a request from two prepared lists' states and index arrays.

        ``make`` calls it instead of :meth:`prepare` when both lists have state from
        :meth:`prep_side`. The core has already checked the indices (1-D, in range, equal
        counts) and that paired lengths are equal. Descriptors arrive unmerged: the core only
        takes this path when merging would not change the request (``merge=False``, or no two
        neighbouring pairs are consecutive in both index arrays).

        Args:
            op: READ or WRITE.
            local_state: :meth:`prep_side` of the initiator's list.
            local_idx: (N,) integer indices into the local list (any integer dtype).
            remote_state: :meth:`prep_side` of the peer's list.
            remote_idx: (N,) indices into the remote list; may be the same array object as
                ``local_idx``.
            peer: the remote agent's name (this agent's own name for loopback).
        """
        raise NotSupportedError(f"backend {self.name} does not prepare from index arrays")

    @abc.abstractmethod
    def post(self, req: BackendRequest, notif: bytes | None) -> XferStatus:
        """Start the transfer; DONE if it finished inline, else IN_PROGRESS; ERROR sets req.error.

        ``notif`` (when not None) must reach the peer only after the data is visible there.
        """

    def post_stream(self, req: BackendRequest, notif: bytes | None, stream: Any) -> XferStatus:
        """Like :meth:`post`, but the transfer starts after the work queued on ``stream``.

        Only for ``supports_stream`` backends; the wait happens on the device (no host
        synchronize). ``stream`` is whatever the backend documents (for CUDA: a cupy, torch or
        cuda.core stream, or a raw ``cudaStream_t``).

        Raises:
            NotSupportedError: the backend has no stream order (names it).
        """
        raise NotSupportedError(
            f"backend {self.name} cannot order a transfer after a stream (post(stream=...)); "
            "synchronize the stream and post without it"
        )

    def completion_event(self, req: BackendRequest) -> Any:
        """An event (e.g. a ``cupy.cuda.Event``) that completes with the request's last post.

        Only called for a request that was posted and not released.

        Raises:
            NotSupportedError: the backend has no completion events (names it).
        """
        raise NotSupportedError(
            f"backend {self.name} has no completion events; wait for the request with "
            "check() / wait()"
        )

    @abc.abstractmethod
    def poll(self, req: BackendRequest) -> XferStatus:
        """Progress and report the request's state; ERROR sets req.error."""

    def block(self, req: BackendRequest, timeout: float) -> None:  # noqa: B027
        """Optionally wait (up to ``timeout`` s) for the request to leave IN_PROGRESS.

        Called by :meth:`XferRequest.wait` between polls. The default returns at once (the
        caller polls again); a backend whose completions arrive on its own thread blocks on
        them here, so that waiting does not spin a CPU the transfer needs.
        """

    @abc.abstractmethod
    def release(self, req: BackendRequest) -> None:
        """Free the request, aborting it if still running. Must not block for long.

        Raises:
            RepostActiveError: the request cannot be aborted right now.
        """

    # ------------------------------------------------------------------ notifications
    def get_notifs(self) -> list[tuple[str, bytes]]:
        """Hand over (sender, message) pairs received since the last call, each exactly once."""
        return []

    def send_notif(self, peer: str, msg: bytes) -> None:
        """Send a standalone notification."""
        raise NotSupportedError(f"backend {self.name} does not support notifications")

    # ------------------------------------------------------------------ misc
    def query_mem(
        self, mem_type: MemType, rows: U64, metas: Sequence[bytes]
    ) -> list[dict[str, Any] | None]:
        """Storage backends: facts about regions (size, mode, mtime) or None where missing."""
        raise NotSupportedError(f"backend {self.name} does not support query_mem")

    def close(self) -> None:  # noqa: B027
        """Stop threads and free native resources. Idempotent."""
