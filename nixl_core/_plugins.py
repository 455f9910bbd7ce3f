"""Plugin discovery: entry points, allow/block lists, the backend registry.

Boot order (:func:`get_plugin_manager`): add the hook specs; load each ``nixl.backends`` entry
point ourselves (honouring ``NIXL_PLUGINS`` and ``NIXL_DISABLE_PLUGINS``, one try/except per
entry point); register the core's internal plugin (the loopback backend and the default backend
choice); check for unknown hooks; call ``nixl_register_backends``.

A plugin whose import fails because a *dependency* is missing (an ImportError naming another
package, or an OSError from loading a shared library) is skipped with its reason, logged once at
WARNING and shown by :func:`list_backends`. An ImportError inside the plugin's own package, or any
other exception, is a bug and raises.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

from nixl_core import hookspecs
from nixl_core.backend import Backend
from nixl_core.errors import BackendNotFoundError, PluginError

if TYPE_CHECKING:
    from nixl_core.agent import Agent
    from nixl_core.backend import XferOp
    from nixl_core.memory import MemType

__all__ = [
    "ENTRY_POINT_GROUP",
    "PLUGIN_API_VERSION",
    "BackendInfo",
    "BackendRegistry",
    "get_plugin_manager",
    "list_backends",
    "reset_plugin_manager",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "nixl.backends"
#: Bumped when the Backend contract changes incompatibly; plugins may set ``api_version``.
PLUGIN_API_VERSION = 1

#: Install hints for backends this project ships as separate distributions.
INSTALL_HINTS: dict[str, str] = {
    "UCX": "pip install nixl-ucx",
    "POSIX": "pip install nixl-posix",
    "NVLINK": "pip install 'nixl-nvlink[cu13]'",
    "GDS": "pip install nixl-gds",
    "GDS_MT": "pip install nixl-gds",
}


@attrs.frozen
class BackendInfo:
    """One line of :func:`list_backends`."""

    name: str
    plugin: str
    available: bool
    reason: str
    mem_types: tuple[str, ...]
    capabilities: dict[str, bool]
    params: dict[str, str]


class BackendRegistry:
    """Backend classes provided by plugins, keyed by upper-case name."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Backend]] = {}
        self._owner: dict[str, str] = {}
        self.current_plugin = "<internal>"

    def add(self, cls: type[Backend]) -> None:
        """Add a backend class.

        Raises:
            PluginError: not a Backend subclass, missing name or memory types, inconsistent flags,
                incompatible api_version, or a name another plugin already registered.
        """
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise PluginError(f"plugin {self.current_plugin}: {cls!r} is not a Backend subclass")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {self.current_plugin}: {cls.__qualname__} has no name")
        if not getattr(cls, "mem_types", None):
            raise PluginError(f"plugin {self.current_plugin}: backend {name} declares no mem_types")
        if cls.supports_remote and not cls.supports_notif:
            raise PluginError(
                f"plugin {self.current_plugin}: backend {name} supports remote agents but not "
                "notifications (remote-capable backends must deliver notifications)"
            )
        api = getattr(cls, "api_version", PLUGIN_API_VERSION)
        if api != PLUGIN_API_VERSION:
            raise PluginError(
                f"plugin {self.current_plugin}: backend {name} targets plugin API {api}, "
                f"nixl-core provides {PLUGIN_API_VERSION}"
            )
        key = name.upper()
        if key in self._classes and self._classes[key] is not cls:
            raise PluginError(
                f"backend {name} registered twice: by {self._owner[key]} and {self.current_plugin}"
            )
        self._classes[key] = cls
        self._owner[key] = self.current_plugin

    def get(self, name: str) -> type[Backend]:
        """The class for a backend name (case-insensitive).

        Raises:
            BackendNotFoundError: no plugin provides it (with an install hint when known).
        """
        key = name.upper()
        try:
            return self._classes[key]
        except KeyError:
            raise BackendNotFoundError(name, INSTALL_HINTS.get(key), tuple(self._classes)) from None

    def names(self) -> list[str]:
        """Registered backend names, sorted."""
        return sorted(self._classes)

    def owner(self, name: str) -> str:
        """Entry-point name of the plugin that registered a backend."""
        return self._owner[name.upper()]


class _CorePlugin:
    """The core's own hook implementations: the loopback backend and the default choice."""

    @hookspecs.hookimpl
    def nixl_register_backends(self, registry: BackendRegistry) -> None:
        from nixl_core._loopback import LoopbackBackend

        registry.add(LoopbackBackend)

    @hookspecs.hookimpl(trylast=True)
    def nixl_select_backend(
        self,
        agent: Agent,
        op: XferOp | None,
        local_mem: MemType,
        remote_mem: MemType | None,
        peer: str,
        candidates: Sequence[str],
    ) -> str | None:
        return candidates[0] if candidates else None


@attrs.define
class PluginManager:
    """The pluggy manager plus what discovery found."""

    pm: pluggy.PluginManager
    registry: BackendRegistry
    skipped: dict[str, str]
    custom_select: bool


_lock = threading.Lock()
_manager: PluginManager | None = None


def _env_list(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {x.strip().lower() for x in raw.split(",") if x.strip()}


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> ModuleType | str | None:
    """The plugin object, or a string saying why it was skipped."""
    own_pkg = ep.value.split(":")[0].split(".")[0]
    try:
        obj: Any = ep.load()
    except ImportError as exc:
        missing = exc.name or ""
        if missing == own_pkg or missing.startswith(own_pkg + "."):
            raise PluginError(f"plugin {ep.name} ({ep.value}) is broken: {exc}") from exc
        return f"a dependency is missing: {exc}"
    except OSError as exc:  # a native library that cannot be loaded
        return f"a native library could not be loaded: {exc}"
    return obj  # type: ignore[no-any-return]


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager (discovery runs once; see :func:`reset_plugin_manager`)."""
    global _manager
    with _lock:
        if _manager is not None:
            return _manager
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        if os.environ.get("NIXL_TRACE_HOOKS", "").lower() in ("1", "true", "yes", "on"):
            pm.add_hookcall_monitoring(
                lambda name, impls, kw: logger.info("hook %s -> %d impls", name, len(impls)),
                lambda outcome, name, impls, kw: logger.info("hook %s done", name),
            )
        allow = _env_list("NIXL_PLUGINS")
        block = _env_list("NIXL_DISABLE_PLUGINS") or set()
        skipped: dict[str, str] = {}
        for ep in _entry_points():
            name = ep.name.lower()
            if name in block or (allow is not None and name not in allow):
                logger.debug("plugin %s skipped by NIXL_PLUGINS/NIXL_DISABLE_PLUGINS", name)
                skipped[name] = "disabled by NIXL_PLUGINS / NIXL_DISABLE_PLUGINS"
                continue
            obj = _load_entry_point(ep)
            if isinstance(obj, str):
                logger.warning("nixl plugin %s skipped: %s", name, obj)
                skipped[name] = obj
                continue
            if pm.is_registered(obj) or pm.get_plugin(name) is not None:
                continue
            pm.register(obj, name=name)
        if "loopback" not in block:
            pm.register(_CorePlugin(), name="loopback")
        else:
            skipped["loopback"] = "disabled by NIXL_DISABLE_PLUGINS"
        pm.check_pending()
        registry = BackendRegistry()
        # Call the registration hook one implementation at a time (pluggy's call order) so the
        # registry can say which plugin added which backend.
        for impl in reversed(pm.hook.nixl_register_backends.get_hookimpls()):
            registry.current_plugin = impl.plugin_name
            impl.function(registry=registry)
        registry.current_plugin = "<internal>"
        impls = pm.hook.nixl_select_backend.get_hookimpls()
        custom = any(not isinstance(i.plugin, _CorePlugin) for i in impls)
        _manager = PluginManager(pm=pm, registry=registry, skipped=skipped, custom_select=custom)
        return _manager


def reset_plugin_manager() -> None:
    """Forget the discovered plugins; the next agent rediscovers (for tests and env changes)."""
    global _manager
    with _lock:
        _manager = None


def list_backends() -> list[BackendInfo]:
    """Every backend the installed plugins provide, available or not and why, plus skipped plugins."""
    mgr = get_plugin_manager()
    out: list[BackendInfo] = []
    for name in mgr.registry.names():
        cls = mgr.registry.get(name)
        try:
            avail = cls.probe()
            ok, reason = avail.available, avail.reason
        except Exception as exc:  # probe() must never raise; report a broken one instead
            ok, reason = False, f"probe() raised {type(exc).__name__}: {exc}"
        out.append(
            BackendInfo(
                name=cls.name,
                plugin=mgr.registry.owner(name),
                available=ok,
                reason=reason,
                mem_types=tuple(sorted(m.value for m in cls.mem_types)),
                capabilities=cls.capabilities(),
                params=dict(cls.default_params),
            )
        )
    for plugin, why in sorted(mgr.skipped.items()):
        out.append(BackendInfo(plugin.upper(), plugin, False, f"plugin skipped: {why}", (), {}, {}))
    return out


def format_backends(infos: Sequence[BackendInfo]) -> str:
    """A human-readable table of :func:`list_backends`."""
    rows = [("backend", "plugin", "available", "mem types", "local/remote/notif", "reason")]
    for b in infos:
        caps = (
            "/".join("y" if b.capabilities.get(k) else "-" for k in ("local", "remote", "notif"))
            if b.capabilities
            else ""
        )
        rows.append(
            (
                b.name,
                b.plugin,
                "yes" if b.available else "no",
                ",".join(b.mem_types),
                caps,
                b.reason,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
    return "\n".join(lines)
