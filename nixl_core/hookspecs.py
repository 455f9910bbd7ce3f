"""The plugin contract: pluggy hook specifications for project ``"nixl"``.

A transport plugin is a distribution that declares an entry point in the group ``nixl.backends``
pointing at a module with hook implementations. The entry-point name (e.g. ``ucx``) is the name
used by the ``NIXL_PLUGINS`` allow list and the ``NIXL_DISABLE_PLUGINS`` block list. The module
must import nothing native: native libraries (libucp, CUDA, kvikio) are loaded in the backend's
``probe()`` or constructor. A typical plugin module::

    from nixl_core import hookimpl

    @hookimpl
    def nixl_register_backends(registry):
        from nixl_ucx.backend import UcxBackend
        registry.add(UcxBackend)

Hooks are called off the data path only: at discovery, at agent start and close, and to choose
a backend — once per distinct (op, memory types, peer, candidates) per agent; the answer is
cached, so ``make`` / ``create`` calls after the first reuse it without calling pluggy (and when
no plugin implements ``nixl_select_backend``, the core picks the first candidate without the
hook). Nothing per descriptor, per request or per poll goes through pluggy. A plugin whose
``nixl_register_backends`` raises is skipped (its reason shown by ``python -m nixl_core
backends``); the other plugins stay usable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from nixl_core._plugins import BackendRegistry
    from nixl_core.agent import Agent
    from nixl_core.backend import XferOp
    from nixl_core.memory import MemType

__all__ = ["hookimpl", "hookspec"]

PROJECT = "nixl"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def nixl_register_backends(registry: BackendRegistry) -> None:
    """Add the Backend subclasses this plugin provides.

    Called once per plugin manager, after discovery. Use ``registry.add(cls)``; it checks that
    the class is a :class:`~nixl_core.backend.Backend` with a name, memory types and consistent
    capability flags, and that no other plugin registered the same name.

    Args:
        registry: the registry to add backend classes to.
    """


@hookspec(firstresult=True)
def nixl_select_backend(
    agent: Agent,
    op: XferOp | None,
    local_mem: MemType,
    remote_mem: MemType | None,
    peer: str,
    candidates: Sequence[str],
) -> str | None:
    """Choose the backend for a prepared list or a one-shot transfer.

    The first non-None answer wins; the core's own default (registered ``trylast``) picks the
    first candidate in backend-creation order. An answer that is not among ``candidates`` is an
    error. Each agent asks once per distinct (op, local_mem, remote_mem, peer, candidates) and
    caches the answer, so the choice must depend on those arguments only.

    Args:
        agent: the initiating agent.
        op: READ or WRITE for a transfer; None when preparing a list (op not known yet).
        local_mem: memory type of the local descriptors.
        remote_mem: memory type of the remote descriptors (None when preparing one side).
        peer: the remote agent's name (own name for loopback, "" for the local side of a prep).
        candidates: backends that can carry the transfer, in creation order.

    Returns:
        A backend name from ``candidates``, or None to let another implementation decide.
    """


@hookspec
def nixl_agent_started(agent: Agent) -> None:
    """Called once when an agent finished creating its configured backends (lifecycle only)."""


@hookspec
def nixl_agent_closing(agent: Agent) -> None:
    """Called once when an agent starts closing, before memory is deregistered."""
