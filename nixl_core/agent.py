"""The agent: backends, registration, metadata, transfers, notifications.

An :class:`Agent` is NIXL's ``nixlAgent`` with Python names. It owns its backends (one per type),
its registered memory (:class:`~nixl_core.memory.Regions`), what it loaded of remote agents
(:class:`~nixl_core.metadata.RemoteAgent`) and the requests it made. Every descriptor is checked
— vectorized — to lie inside one registration of the same memory type and device before any
backend sees it. This module is the façade: registration bookkeeping lives in
:mod:`nixl_core.memory`, metadata export and loading in :mod:`nixl_core.metadata`, descriptor
checks, gathers and merging in ``nixl_core._plan``, the request state machine in
:mod:`nixl_core.xfer`.

Typical use (initiator side)::

    agent = Agent("decode-0", AgentConfig(backends=("UCX",)))
    agent.register(kv_cache_tensor)
    peer = agent.add_remote(peer_metadata_bytes)
    local = agent.prep("", DescList.strided("VRAM", base, blk, n, blk, dev=0))
    remote = agent.prep(peer, remote_descs)
    req = agent.make("READ", local, idx, remote, idx, notif=b"req-17")
    req.post(); req.wait(timeout=5.0); req.release()
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from nixl_core import _plan
from nixl_core._malloc import tune_malloc
from nixl_core._plugins import INSTALL_HINTS, default_backend, get_plugin_manager
from nixl_core.backend import Backend, BackendRequest, XferOp, XferSide
from nixl_core.descriptors import DescList, RegDescList, as_descs, as_reg_descs
from nixl_core.discovery.service import MdOp, MetadataService
from nixl_core.discovery.store import DEFAULT_TTL, MetadataStore
from nixl_core.errors import (
    BackendUnavailableError,
    DuplicateBackendError,
    InvalidParamError,
    MemTypeError,
    NixlError,
    NotFoundError,
    NotSupportedError,
    RemoteDisconnectError,
    StaleHandleError,
    TransferCanceledError,
    TransferError,
    UnknownAgentError,
    foreign_error,
)
from nixl_core.memory import MemType, Regions, deregister_regions, register_regions
from nixl_core.metadata import (
    AgentMetadata,
    RemoteAgent,
    export_metadata,
    load_metadata,
    new_incarnation,
    unload_remote,
)
from nixl_core.params import resolve_params
from nixl_core.xfer import PreppedList, XferRequest, XferTelemetry

__all__ = ["INIT_AGENT", "Agent", "AgentConfig"]

logger = logging.getLogger(__name__)

#: Name that means "the initiator's own memory" in :meth:`Agent.prep` (NIXL's NIXL_INIT_AGENT).
INIT_AGENT = ""


@attrs.define
class AgentConfig:
    """Agent configuration.

    Attributes:
        backends: backends to create at start. None: the core's default
            (:func:`~nixl_core.default_backend`: UCX when its plugin is available here, else the
            reference LOOPBACK backend). Unavailable backends named here raise.
        backend_params: per-backend parameters, e.g. ``{"UCX": {"num_workers": 2}}``; they
            rank below explicit ``create_backend`` params and above environment variables
            (:mod:`nixl_core.params`).
        num_threads: when > 0, the ``num_threads`` of every backend that has one (NIXL's
            meaning), below ``backend_params``.
        enable_prog_thread: when not None, the ``progress_thread`` of every backend that has
            one, below ``backend_params``; None leaves each backend's own default.
        tune_malloc: raise glibc's mmap/trim thresholds for the process when the agent starts
            (the descriptor path's numpy temporaries then reuse heap memory instead of page
            faulting; see ``nixl_core._malloc``). None: the environment decides
            (``NIXL_MALLOC_TUNE=0`` turns it off), default on.
        listen: run the metadata side-channel listener (NIXL's ``enable_listen_thread``).
        listen_host: the address it binds: loopback unless set (``"0.0.0.0"`` for every
            interface, only when asked).
        listen_port: its port; 0 picks a free one (logged: ``MD listener is listening on port
            N``; :attr:`Agent.listen_port` tells it too).
        md_store: the name-addressed metadata store: ``"etcd://host:port[,host:port]"``,
            ``"tcpstore://host:port"``, a :class:`~nixl_core.discovery.MetadataStore`, or None
            for NIXL's ``NIXL_ETCD_ENDPOINTS`` / ``NIXL_TCPSTORE_ENDPOINT``.
        md_namespace: etcd key namespace (None: ``NIXL_ETCD_NAMESPACE``, else
            ``/nixl/agents/``).
        md_ttl: seconds this agent's store keys outlive it (etcd lease TTL).
        md_timeout: default seconds a fetch waits for a peer's metadata.
        md_key: shared key authenticating every side-channel frame and store value
            (HMAC-SHA256); None: ``NIXL_MD_KEY``, else none.
    """

    backends: Sequence[str] | None = None
    backend_params: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    num_threads: int = 0
    enable_prog_thread: bool | None = None
    tune_malloc: bool | None = None
    listen: bool = False
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    md_store: MetadataStore | str | None = None
    md_namespace: str | None = None
    md_ttl: float = DEFAULT_TTL
    md_timeout: float = 5.0
    md_key: bytes | str | None = None

    def layers(self, backend: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """This config's params for one backend: (``backend_params`` entry, agent-wide ones)."""
        config: dict[str, Any] = {}
        for k, v in self.backend_params.items():
            if k.upper() == backend.upper():
                config.update(v)
        wide: dict[str, Any] = {}
        if self.num_threads > 0:
            wide["num_threads"] = self.num_threads
        if self.enable_prog_thread is not None:
            wide["progress_thread"] = self.enable_prog_thread
        return config, wide


class Agent:
    """A NIXL agent.

    Args:
        name: unique, non-empty agent name.
        config: an :class:`AgentConfig`; keyword arguments override its fields.

    Raises:
        InvalidParamError: empty name, or a bad backend parameter.
        BackendNotFoundError / BackendUnavailableError: a configured backend is missing/unusable.
    """

    def __init__(self, name: str, config: AgentConfig | None = None, **overrides: Any) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidParamError("agent name must be a non-empty string")
        if name in _plan.INIT_ALIASES[1:]:
            raise InvalidParamError(f"agent name {name!r} is reserved")
        self.name = name
        self.config = attrs.evolve(config or AgentConfig(), **overrides)
        tune_malloc(self.config.tune_malloc)
        self._mgr = get_plugin_manager()
        self._backends: dict[str, Backend] = {}
        self._regions = Regions()
        self._remotes: dict[str, RemoteAgent] = {}
        self._requests: weakref.WeakSet[XferRequest] = weakref.WeakSet()
        self._planner = _plan.Planner(self)
        self._lock = threading.RLock()
        self._closed = False
        #: New for every agent object: peers tell a restart from the same agent by it.
        self.incarnation = new_incarnation()
        self._dropped: dict[int, str] = {}  # dropped peers' generations -> why (for messages)
        self._md: MetadataService | None = None
        names = self.config.backends
        if names is None:
            chosen, why = default_backend()
            logger.debug("agent %s: default backend %s (%s)", name, chosen, why)
            names = [chosen]
        try:
            for b in names:
                self.create_backend(b)
            if self.config.listen:
                self._md = self._new_md()
        except BaseException:
            self.close()
            raise
        self._mgr.pm.hook.nixl_agent_started(agent=self)

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, backends={list(self._backends)})"

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ================================================================ backends
    @property
    def backends(self) -> tuple[str, ...]:
        """Names of the created backends, in creation (= preference) order."""
        return tuple(self._backends)

    def backend(self, name: str) -> Backend:
        """A created backend by name (case-insensitive).

        Raises:
            NotFoundError: this agent did not create it.
        """
        b = self._backends.get(name.upper())
        if b is None:
            raise NotFoundError(
                f"agent {self.name!r} has no backend {name!r} "
                f"(created: {', '.join(self._backends) or 'none'})"
            )
        return b

    def create_backend(self, name: str, params: Mapping[str, Any] | None = None) -> Backend:
        """Create a backend from the installed plugins.

        Args:
            name: backend type, e.g. "UCX", "POSIX", "LOOPBACK".
            params: backend parameters; they win over the config's, the environment's
                (``NIXL_<BACKEND>_<PARAM>``) and the defaults (:mod:`nixl_core.params`).

        Raises:
            BackendNotFoundError: no installed plugin provides it (message has an install hint).
            BackendUnavailableError: installed but cannot run here (probe's reason).
            DuplicateBackendError: the agent already has one of this type.
            InvalidParamError: an unknown parameter (with close matches) or a bad value.
        """
        cls = self._mgr.registry.get(name)
        key = cls.name.upper()
        if key in self._backends:
            raise DuplicateBackendError(f"agent {self.name!r} already has a {cls.name} backend")
        avail = cls.probe()
        if not avail.available:
            raise BackendUnavailableError(
                f"backend {cls.name} is not available here: {avail.reason}"
            )
        resolved = resolve_params(cls.name, cls.param_specs, params, *self.config.layers(key))
        try:
            backend = cls(self.name, resolved)
        except NixlError:
            raise
        except Exception as exc:
            raise foreign_error(exc, cls.name, "start") from exc
        self._backends[key] = backend
        return backend

    def _pick(self, names: Sequence[str] | None) -> list[Backend]:
        if not names:
            return list(self._backends.values())
        return [self.backend(n) for n in names]

    # ================================================================ memory
    def register(
        self,
        descs: Any,
        mem_type: MemType | str | None = None,
        *,
        backends: Sequence[str] | None = None,
        metas: Sequence[bytes | str] | None = None,
    ) -> RegDescList:
        """Register memory with every capable backend (or the ones named).

        A backend that fails is left out (with a warning) while the others keep the memory;
        when all fail nothing stays registered. Whatever a backend raises, the agent's books
        stay consistent: the same memory can be registered again after a failure.

        Args:
            descs: tensors, an (N, 3) array, (addr, len, dev[, meta]) tuples or a RegDescList.
            mem_type: needed for arrays and tuples.
            backends: restrict to these backends.
            metas: one bytes field per region (e.g. a FILE path).

        Returns:
            The registration list; pass it to :meth:`deregister`.

        Raises:
            RegistrationError: a region duplicates or overlaps a registered one (names its
                index), or the backend failed (names the backend and the regions).
            NotFoundError: no created backend can register this memory type.
            MemTypeError: a named backend does not support the memory type.
            PluginError: several backends failed (each one's reason).
        """
        reg = as_reg_descs(descs, mem_type, metas)
        mt = reg.mem_type
        if len(reg) == 0:
            raise InvalidParamError("registration list is empty")
        if backends:
            targets = self._pick(backends)
            for b in targets:
                if mt not in b.mem_types:
                    raise MemTypeError(f"backend {b.name} cannot register {mt.value} memory")
        else:
            targets = [b for b in self._backends.values() if mt in b.mem_types]
            if not targets:
                hint = {MemType.FILE: INSTALL_HINTS["POSIX"], MemType.VRAM: INSTALL_HINTS["UCX"]}
                extra = f"; install a backend for it, e.g. `{hint[mt]}`" if mt in hint else ""
                raise NotFoundError(
                    f"no backend of agent {self.name!r} ({', '.join(self._backends) or 'none'}) "
                    f"can register {mt.value} memory{extra}"
                )
        with self._lock:
            register_regions(self._regions, targets, mt, reg.array, reg.metas, self.name)
        return reg

    def deregister(self, descs: Any, *, backends: Sequence[str] | None = None) -> None:
        """Deregister exactly what was registered (each descriptor must match a registration).

        Raises:
            RegistrationError: a descriptor matches no registration (names its index), or a
                backend failed to deregister (it is forgotten anyway).
        """
        reg = descs if isinstance(descs, DescList) else as_reg_descs(descs)
        with self._lock:
            deregister_regions(self._regions, self._pick(backends), reg, self.name)

    def registered(self, mem_type: MemType | str) -> RegDescList:
        """The regions registered for a memory type (table order)."""
        mt = MemType.parse(mem_type)
        t = self._regions.tables.get(mt)
        if t is None or len(t) == 0:
            return RegDescList(mt)
        metas = [self._regions.metas.get(s, b"") for s in t.slots.tolist()]
        return RegDescList(mt, t.rows(), metas)

    def query_mem(
        self, descs: Any, backend: str, mem_type: MemType | str | None = None
    ) -> list[dict[str, Any] | None]:
        """Ask one backend about regions (storage: size/mode/mtime of a path, or None)."""
        reg = as_reg_descs(descs, mem_type)
        return self.backend(backend).query_mem(reg.mem_type, reg.array, reg.metas)

    # ================================================================ metadata
    def metadata(self) -> bytes:
        """This agent's full metadata: name, connection info, every registration's public blob.

        Raises:
            NotSupportedError: no backend of this agent supports remote agents.
        """
        return self._export(None, True, None)

    def partial_metadata(
        self,
        descs: Any = None,
        include_conn_info: bool = False,
        backends: Sequence[str] | None = None,
    ) -> bytes:
        """Metadata for a subset: connection info only (``descs`` empty) or the given regions.

        Raises:
            NotFoundError: a descriptor is not exactly a registration (names its index).
        """
        if descs is None or (isinstance(descs, (list, tuple)) and len(descs) == 0):
            return self._export(None, True, backends, with_regions=False)
        return self._export(as_reg_descs(descs), include_conn_info, backends)

    def _export(
        self,
        subset: RegDescList | None,
        conn_info: bool,
        backends: Sequence[str] | None,
        with_regions: bool = True,
    ) -> bytes:
        rb = [b for b in self._pick(backends) if b.supports_remote]
        if not rb:
            raise NotSupportedError(
                f"agent {self.name!r} has no backend that supports remote agents "
                f"({', '.join(self._backends) or 'none'})"
            )
        with self._lock:
            return export_metadata(
                self.name, self.incarnation, self._regions, rb, subset, conn_info, with_regions
            )

    def add_remote(self, metadata: bytes) -> str:
        """Load a remote agent's (full or partial) metadata; loads are additive.

        Returns:
            The remote agent's name.

        Raises:
            MetadataError: truncated, corrupt or unknown-version metadata.
            InvalidParamError: the metadata is this agent's own.
            NotAllowedError: changed connection info or blob for something already loaded, or a
                region overlapping a different one loaded before (the peer re-registered).
            PluginError: no backend in common with the remote agent.
        """
        return self._load_metadata(AgentMetadata.decode(metadata))

    def _load_metadata(self, md: AgentMetadata) -> str:
        """add_remote after decoding (the metadata service loads through here too).

        Metadata of another incarnation than the one loaded is a restarted peer: the old one
        is dropped first (its lists go stale, its in-flight requests fail), never merged.
        """
        if md.name == self.name:
            raise InvalidParamError(f"metadata of agent {md.name!r} is this agent's own")
        with self._lock:
            old = self._remotes.get(md.name)
            if old is not None and old.incarnation != md.incarnation:
                logger.info(
                    "agent %s: remote agent %s restarted; replacing its metadata",
                    self.name,
                    md.name,
                )
                self._drop_remote(
                    md.name,
                    "restarted (metadata of a new incarnation arrived)",
                    RemoteDisconnectError,
                )
            load_metadata(self._remotes, md, self._backends, self.name)
        return md.name

    def remove_remote(self, name: str) -> None:
        """Forget a remote agent: unload its regions and disconnect every backend from it.

        Prepared lists and requests made against it are refused afterwards (even after a
        re-add: :class:`~nixl_core.errors.StaleHandleError`); requests still in flight end in
        :class:`~nixl_core.errors.TransferCanceledError`. A peer fetched from a store is no
        longer watched.

        Raises:
            UnknownAgentError: no metadata is loaded for it.
        """
        if self._md is not None:
            self._md.forget(name)
        with self._lock:
            if name not in self._remotes:
                raise UnknownAgentError(name)
            self._drop_remote(name, "removed by remove_remote()", TransferCanceledError)

    def _drop_remote(self, name: str, why: str, error: type[TransferError]) -> None:
        """Forget a loaded peer; requests to it still in flight end in ``error`` (under lock)."""
        remote = self._remotes.pop(name)
        self._dropped[remote.generation] = why
        while len(self._dropped) > 4096:  # bounded: only for messages
            del self._dropped[next(iter(self._dropped))]
        for req in list(self._requests):
            if req.peer == name and req._gen == remote.generation:
                req._abandon(error(f"{req!r} did not complete: remote agent {name!r} {why}"))
        unload_remote(remote, self._backends)

    def _invalidate_remote(
        self, name: str, incarnation: bytes, why: str, unexpected: bool = True
    ) -> None:
        """Drop a peer on its own word or its store's (only the incarnation named)."""
        with self._lock:
            remote = self._remotes.get(name)
            if remote is None or remote.incarnation != incarnation:
                return
            logger.log(
                logging.WARNING if unexpected else logging.INFO,
                "agent %s: remote agent %s %s; dropping it",
                self.name,
                name,
                why,
            )
            try:
                self._drop_remote(name, why, RemoteDisconnectError)
            except NixlError as exc:  # teardown of a dead peer is best effort
                logger.debug("dropping %s: %s", name, exc)

    def _remote_incarnation(self, name: str) -> bytes | None:
        remote = self._remotes.get(name)
        return remote.incarnation if remote is not None else None

    @property
    def remote_agents(self) -> tuple[str, ...]:
        """Names of the remote agents whose metadata is loaded."""
        return tuple(self._remotes)

    def check_remote(
        self, name: str, descs: Any = None, mem_type: MemType | str | None = None
    ) -> bool:
        """True if metadata for ``name`` is loaded (and, given descs, some backend covers them).

        Raises:
            NixlError: the latest :meth:`fetch_metadata` of ``name`` failed (its typed error,
                raised once: MetadataTimeoutError, MetadataError, RemoteDisconnectError, ...).
        """
        if self._md is not None:
            self._md.raise_failed(name)
        if name not in self._remotes:
            return False
        if descs is None:
            return True
        try:
            self.prep(name, descs, mem_type)
        except NixlError:
            return False
        return True

    def make_connection(self, name: str, backends: Sequence[str] | None = None) -> None:
        """Connect eagerly to a remote agent on every common backend (optional: connects are lazy).

        Raises:
            UnknownAgentError: no metadata is loaded for it.
        """
        remote = self._remote(name)
        for b in self._pick(backends):
            if b.name in remote.conns:
                b.connect(name)

    def _remote(self, name: str) -> RemoteAgent:
        remote = self._remotes.get(name)
        if remote is None:
            raise UnknownAgentError(name)
        return remote

    def _check_generation(self, peer: str, generation: int) -> None:
        if peer == self.name:
            return
        remote = self._remotes.get(peer)
        if remote is not None and remote.generation == generation:
            return
        why = self._dropped.get(generation, "was removed")
        now = "its metadata is not loaded" if remote is None else "newer metadata is loaded"
        raise StaleHandleError(
            peer,
            f"made against metadata of agent {peer!r} that is void: the agent {why}; {now}, "
            "prepare the list again",
        )

    # ================================================================ metadata services
    def _new_md(self) -> MetadataService:
        c = self.config
        return MetadataService(
            self,
            listen=c.listen,
            host=c.listen_host,
            port=c.listen_port,
            store=c.md_store,
            namespace=c.md_namespace,
            ttl=c.md_ttl,
            timeout=c.md_timeout,
            key=c.md_key,
        )

    @property
    def md(self) -> MetadataService:
        """The metadata service (created on first use; with ``listen`` at start)."""
        with self._lock:
            if self._md is None:
                if self._closed:
                    raise NotSupportedError(f"agent {self.name!r} is closed")
                self._md = self._new_md()
            return self._md

    @property
    def listen_port(self) -> int | None:
        """The side-channel listener's port, or None when not listening."""
        return self._md.listen_port if self._md is not None else None

    def publish_metadata(
        self,
        descs: Any = None,
        *,
        label: str | None = None,
        conn_info: bool = True,
        backends: Sequence[str] | None = None,
        addr: tuple[str, int] | None = None,
    ) -> MdOp:
        """Publish this agent's metadata, full or partial, to the store or to a peer's listener.

        See :meth:`MetadataService.publish`. Returns at once; ``.wait()`` raises a failure.
        """
        return self.md.publish(
            descs, label=label, conn_info=conn_info, backends=backends, addr=addr
        )

    def fetch_metadata(
        self,
        name: str | None,
        *,
        label: str | None = None,
        addr: tuple[str, int] | None = None,
        timeout: float | None = None,
        wait: bool = False,
    ) -> MdOp:
        """Fetch a peer's metadata from the store (by name) or its listener (``addr``) and load
        it when it arrives; :meth:`check_remote` tells when (and raises a failure).

        See :meth:`MetadataService.fetch`.
        """
        return self.md.fetch(name, label=label, addr=addr, timeout=timeout, wait=wait)

    def invalidate_metadata(self, *, addr: tuple[str, int] | None = None) -> MdOp:
        """Withdraw this agent's metadata from the store, or from one peer (``addr``)."""
        return self.md.invalidate(addr=addr)

    # ================================================================ transfers
    def prep(
        self,
        peer: str,
        descs: Any,
        mem_type: MemType | str | None = None,
        *,
        backends: Sequence[str] | None = None,
    ) -> PreppedList:
        """Check descriptors once against a side's registrations, for later :meth:`make` calls.

        Args:
            peer: "" (or "NIXL_INIT_AGENT") for the initiator's own memory, a remote agent's name,
                or this agent's own name for loopback (storage, same-agent copies).
            descs: a DescList, (N, 3) array, tuples or tensors.
            mem_type: needed for arrays and tuples.
            backends: restrict to these backends.

        Raises:
            InvalidDescriptorError: a descriptor lies outside every registration (names its index).
            UnknownAgentError: no metadata for ``peer``.
            NotFoundError: no backend covers every descriptor.
        """
        return self._planner.prep(peer, as_descs(descs, mem_type), backends)

    def resolve(
        self, peer: str, descs: Any, mem_type: MemType | str | None = None, *, backend: str
    ) -> XferSide:
        """Descriptors resolved to one backend's registration handles, for backend helpers.

        A backend's own API that works on user descriptors (e.g. NVLINK's ``mem_view``) takes
        this instead of keeping its own registration lookup: the descriptors are checked like a
        transfer's (vectorized), and the result is the side a transfer would hand the backend.

        Args:
            peer: "" for this agent's own registrations, a remote agent's name for its loaded
                regions, or this agent's own name for the loopback view of its own memory.
            descs: a DescList, (N, 3) array, tuples or tensors.
            mem_type: needed for arrays and tuples.
            backend: the backend whose handles are wanted.

        Raises:
            InvalidDescriptorError: a descriptor lies outside every registration (names it).
            UnknownAgentError: no metadata for ``peer``.
            NotFoundError: the backend does not hold every descriptor's registration.
        """
        return self._planner.resolve(peer, as_descs(descs, mem_type), self.backend(backend))

    def make(
        self,
        op: XferOp | str,
        local: PreppedList,
        local_idx: Any,
        remote: PreppedList,
        remote_idx: Any,
        notif: bytes | str | None = None,
        *,
        merge: bool = True,
        backends: Sequence[str] | None = None,
    ) -> XferRequest:
        """Make a request from prepared lists and index arrays (NIXL's make_prepped_xfer).

        Neighbouring descriptors that are contiguous on both sides (and in the same
        registrations) are merged with vectorized arithmetic unless ``merge=False``. The
        backend is the first both lists have in common (or ``nixl_select_backend``'s answer,
        asked once per op, memory types, peer and candidates).

        Raises:
            InvalidParamError: wrong op, empty or out-of-range indices, lists of another agent.
            LengthMismatchError: index counts differ, or paired descriptors differ in length.
            StaleHandleError: the remote list was prepared against replaced metadata.
        """
        return self._planner.make(
            XferOp.parse(op), local, local_idx, remote, remote_idx, notif, merge, backends
        )

    def create(
        self,
        op: XferOp | str,
        local: Any,
        remote: Any,
        peer: str,
        notif: bytes | str | None = None,
        *,
        mem_types: tuple[MemType | str | None, MemType | str | None] = (None, None),
        merge: bool = True,
        backends: Sequence[str] | None = None,
    ) -> XferRequest:
        """One-shot request: check both lists and pick a backend (NIXL's initialize_xfer).

        Args:
            op: "READ" or "WRITE".
            local: the initiator's descriptors.
            remote: the peer's descriptors (peer = own name for loopback).
            peer: remote agent name, or this agent's own name.
            notif: notification delivered to the peer after the data is visible.
            mem_types: memory types for array/tuple inputs (local, remote).
            merge: merge contiguous neighbours.
            backends: restrict the choice.

        Raises:
            LengthMismatchError, InvalidDescriptorError, UnknownAgentError, NotFoundError.
        """
        xop = XferOp.parse(op)
        ld, rd = as_descs(local, mem_types[0]), as_descs(remote, mem_types[1])
        return self._planner.create(xop, ld, rd, peer, notif, merge, backends)

    def _request(
        self,
        op: XferOp,
        backend: Backend,
        breq: BackendRequest,
        peer: str,
        gen: int,
        notif: bytes | str | None,
        desc_count: int,
        total_bytes: int,
    ) -> XferRequest:
        req = XferRequest(
            self,
            backend,
            breq,
            op,
            peer,
            notif.encode() if isinstance(notif, str) else notif,
            desc_count,
            total_bytes,
            gen,
            self._on_error,
        )
        self._requests.add(req)
        return req

    def _on_error(self, req: XferRequest, exc: BaseException) -> None:
        # A peer that died is invalidated (NIXL's REMOTE_DISCONNECT handling), once per generation.
        if isinstance(exc, RemoteDisconnectError) and req.peer != self.name:
            with self._lock:
                remote = self._remotes.get(req.peer)
                if remote is None or remote.generation != req._gen:
                    return
                logger.warning("remote agent %s disconnected; removing its metadata", req.peer)
                try:
                    self._drop_remote(
                        req.peer, "disconnected (a transfer to it failed)", RemoteDisconnectError
                    )
                except NixlError as err:  # teardown of a dead peer is best effort
                    logger.debug("removing %s after disconnect: %s", req.peer, err)

    def _forget(self, req: XferRequest) -> None:
        self._requests.discard(req)

    # thin wrappers in NIXL's spirit -------------------------------------------------
    def post(self, req: XferRequest, notif: Any = ..., *, stream: Any = None) -> Any:
        """Post a request (see :meth:`XferRequest.post`)."""
        return req.post(stream=stream) if notif is ... else req.post(notif, stream=stream)

    def check(self, req: XferRequest) -> Any:
        """Check a request (see :meth:`XferRequest.check`)."""
        return req.check()

    def release(self, req: XferRequest | PreppedList) -> None:
        """Release a request (aborting it if running) or a prepared list."""
        req.release()

    def telemetry(self, req: XferRequest) -> XferTelemetry:
        """Telemetry of a request's last completed post."""
        return req.telemetry

    # ================================================================ notifications
    def get_notifs(self, backends: Sequence[str] | None = None) -> dict[str, list[bytes]]:
        """Notifications received since the last call, keyed by sender; each handed over once."""
        out: dict[str, list[bytes]] = {}
        for b in self._pick(backends):
            if not b.supports_notif:
                continue
            for sender, msg in b.get_notifs():
                out.setdefault(sender, []).append(msg)
        return out

    def send_notif(
        self, peer: str, msg: bytes | str, backends: Sequence[str] | None = None
    ) -> None:
        """Send a standalone notification (to a remote agent, or to this agent itself).

        Raises:
            UnknownAgentError: no metadata for ``peer``.
            NotFoundError: no notification-capable backend reaches it.
        """
        data = msg.encode() if isinstance(msg, str) else bytes(msg)
        if peer == self.name:
            cands = [b for b in self._pick(backends) if b.supports_notif and b.supports_local]
        else:
            remote = self._remote(peer)
            cands = [b for b in self._pick(backends) if b.supports_notif and b.name in remote.conns]
        if not cands:
            raise NotFoundError(
                f"no notification-capable backend of agent {self.name!r} reaches {peer!r}"
            )
        cands[0].send_notif(peer, data)

    # ================================================================ teardown
    def close(self) -> None:
        """Release requests, deregister all memory, forget remotes, close backends (idempotent)."""
        if self._closed:
            return
        self._closed = True
        md = getattr(self, "_md", None)
        if md is not None:
            md.close()
        if hasattr(self, "_mgr") and self._backends:
            self._mgr.pm.hook.nixl_agent_closing(agent=self)
        for req in list(self._requests):
            try:
                req.release()
            except NixlError as exc:
                logger.warning("could not release %r at close: %s", req, exc)
        for name in list(self._remotes):
            try:
                self.remove_remote(name)
            except NixlError as exc:
                logger.warning("removing remote %s at close: %s", name, exc)
        for mt, table in list(self._regions.tables.items()):
            if len(table):
                try:
                    self.deregister(self.registered(mt))
                except NixlError as exc:
                    logger.warning("deregistering %s memory at close: %s", mt.value, exc)
        for b in self._backends.values():
            try:
                b.close()
            except Exception as exc:  # a broken backend must not stop the others from closing
                logger.warning("closing backend %s: %s", b.name, exc)
