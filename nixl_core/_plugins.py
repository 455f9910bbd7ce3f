"""Plugin discovery: entry points, allow/block lists, the backend registry.

Boot order (:func:`get_plugin_manager`): add the hook specs; load each ``nixl.backends`` entry
point ourselves (honouring ``NIXL_PLUGINS`` and ``NIXL_DISABLE_PLUGINS``, one try/except per
entry point); register the core's internal plugin (the loopback backend, entry-point name
``loopback``, and the default backend choice); check for unknown hooks; call each plugin's
``nixl_register_backends``, one plugin at a time.

``NIXL_PLUGINS`` is an allow list of plugin names (entry-point names, case-insensitive; the
built-in LOOPBACK backend is the plugin ``loopback``): when set, only the plugins it names are
loaded. ``NIXL_DISABLE_PLUGINS`` is a block list, applied after it.

A plugin is skipped, with its reason logged once at WARNING and shown by :func:`list_backends`
(``python -m nixl_core backends``), when its import fails because a *dependency* is missing (an
ImportError naming another package, or an OSError from loading a shared library), or when its
``nixl_register_backends`` hook raises (whatever it had added is taken back; the other plugins
are kept). An ImportError inside the plugin's own package, or any other exception while
importing it, is a bug and raises.
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
from nixl_core.backend import PLUGIN_API_VERSION, Backend
from nixl_core.errors import BackendNotFoundError, NotFoundError, PluginError
from nixl_core.memory import MemType
from nixl_core.params import Param, env_var

if TYPE_CHECKING:
    from nixl_core.agent import Agent
    from nixl_core.backend import XferOp

__all__ = [
    "ENTRY_POINT_GROUP",
    "PLUGIN_API_VERSION",
    "BackendInfo",
    "BackendRegistry",
    "default_backend",
    "get_plugin_manager",
    "list_backends",
    "reset_plugin_manager",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "nixl.backends"

#: How to install the backends this project ships as separate distributions (all from a clone
#: of the repository; see the README).
INSTALL_HINTS: dict[str, str] = {
    "UCX": "pip install ./plugins/nixl_ucx",
    "POSIX": "pip install ./plugins/nixl_posix",
    "NVLINK": "pip install './plugins/nixl_nvlink[cu13]'",
}
#: The order in which :func:`default_backend` considers backends (others follow by name).
DEFAULT_ORDER = ("UCX", "LOOPBACK")


@attrs.frozen
class ParamInfo:
    """One parameter of a backend, as :func:`list_backends` reports it.

    Attributes:
        name: the parameter's name.
        kind: int, bool, str or custom.
        default: the default, as a string.
        env: its environment variable.
        value: the value an agent created now would get without explicit or config values.
        source: "default" or "env NIXL_..." (where ``value`` comes from).
        accepted: what values are accepted.
        doc: what it does.
    """

    name: str
    kind: str
    default: str
    env: str
    value: str
    source: str
    accepted: str
    doc: str


@attrs.frozen
class BackendInfo:
    """One line of :func:`list_backends`."""

    name: str
    plugin: str
    available: bool
    reason: str
    mem_types: tuple[str, ...]
    capabilities: dict[str, bool]
    params: tuple[ParamInfo, ...] = ()
    notes: tuple[str, ...] = ()


class BackendRegistry:
    """Backend classes provided by plugins, keyed by upper-case name."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Backend]] = {}
        self._owner: dict[str, str] = {}
        self.current_plugin = "<internal>"
        #: entry-point name -> why the plugin was skipped (filled by discovery).
        self.skipped: dict[str, str] = {}
        self._dropped: dict[str, str] = {}  # backend name -> plugin whose hook failed

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
        api = cls.api_version
        if api != PLUGIN_API_VERSION:
            raise PluginError(
                f"plugin {self.current_plugin}: backend {name} targets plugin API {api}, "
                f"nixl-core provides {PLUGIN_API_VERSION}; install a matching version of the plugin"
            )
        specs = cls.param_specs
        if not all(isinstance(p, Param) for p in specs) or len({p.name for p in specs}) != len(
            specs
        ):
            raise PluginError(
                f"plugin {self.current_plugin}: backend {name}'s param_specs must be Param "
                "objects with distinct names"
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
            plugin = self._dropped.get(key, key.lower())
            why = self.skipped.get(plugin)
            if why is not None:
                raise BackendNotFoundError(
                    name, None, tuple(self._classes), f"its plugin {plugin} was skipped: {why}"
                ) from None
            raise BackendNotFoundError(name, INSTALL_HINTS.get(key), tuple(self._classes)) from None

    def names(self) -> list[str]:
        """Registered backend names, sorted."""
        return sorted(self._classes)

    def owner(self, name: str) -> str:
        """Entry-point name of the plugin that registered a backend."""
        return self._owner[name.upper()]

    def drop_plugin(self, plugin: str) -> None:
        """Take back every backend a plugin added (its registration hook failed)."""
        for key in [k for k, owner in self._owner.items() if owner == plugin]:
            del self._classes[key]
            del self._owner[key]
            self._dropped[key] = plugin


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
        if "loopback" in block or (allow is not None and "loopback" not in allow):
            skipped["loopback"] = "disabled by NIXL_PLUGINS / NIXL_DISABLE_PLUGINS"
        else:
            pm.register(_CorePlugin(), name="loopback")
        pm.check_pending()
        registry = BackendRegistry()
        registry.skipped = skipped
        # Call the registration hook one implementation at a time (pluggy's call order) so the
        # registry can say which plugin added which backend, and a plugin whose hook raises is
        # skipped like one that cannot be imported: the others stay usable.
        for impl in reversed(pm.hook.nixl_register_backends.get_hookimpls()):
            registry.current_plugin = impl.plugin_name
            try:
                impl.function(registry=registry)
            except Exception as exc:
                registry.drop_plugin(impl.plugin_name)
                why = f"its nixl_register_backends hook raised {type(exc).__name__}: {exc}"
                logger.warning("nixl plugin %s skipped: %s", impl.plugin_name, why)
                skipped[impl.plugin_name] = why
                pm.unregister(name=impl.plugin_name)
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


def _param_info(backend: str, p: Param) -> ParamInfo:
    var = env_var(backend, p.name)
    raw = os.environ.get(var)
    return ParamInfo(
        name=p.name,
        kind=p.kind,
        default=p.display,
        env=var,
        value=p.display if raw is None else raw,
        source="default" if raw is None else f"env {var}",
        accepted=p.accepted,
        doc=p.doc,
    )


def list_backends() -> list[BackendInfo]:
    """Every backend the installed plugins provide, available or not and why, plus skipped plugins."""
    mgr = get_plugin_manager()
    out: list[BackendInfo] = []
    for name in mgr.registry.names():
        cls = mgr.registry.get(name)
        notes: tuple[str, ...] = ()
        try:
            avail = cls.probe()
            ok, reason, notes = avail.available, avail.reason, tuple(avail.notes)
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
                params=tuple(_param_info(cls.name, p) for p in cls.param_specs),
                notes=notes,
            )
        )
    for plugin, why in sorted(mgr.skipped.items()):
        out.append(BackendInfo(plugin.upper(), plugin, False, f"plugin skipped: {why}", (), {}))
    return out


def default_backend(
    mem_types: Iterable[MemType | str] = (MemType.DRAM,), *, remote: bool = True
) -> tuple[str, str]:
    """The backend to use when none is named, and why (one line).

    The rule (the only copy of it; ``Agent`` and ``nixl-bench`` use it): consider UCX, then
    LOOPBACK, then the other installed backends by name, and take the first that is available
    here, registers every one of ``mem_types`` and reaches other agents (``remote``) or does
    loopback transfers (not ``remote``).

    Raises:
        NotFoundError: no installed backend qualifies (the message lists what is installed
            and why each was passed over).
    """
    wanted = {MemType.parse(m) for m in mem_types}
    mgr = get_plugin_manager()
    reg = mgr.registry
    names = reg.names()
    order = [n for n in DEFAULT_ORDER if n in names] + [n for n in names if n not in DEFAULT_ORDER]
    passed: list[str] = []
    for n in DEFAULT_ORDER:
        if n not in names:
            hint = INSTALL_HINTS.get(n)
            why = mgr.skipped.get(n.lower(), "not installed")
            passed.append(
                f"{n} {why}" + (f" (`{hint}`)" if hint and why == "not installed" else "")
            )
    for n in order:
        cls = reg.get(n)
        try:
            avail = cls.probe()
        except Exception as exc:  # a broken probe() is reported, never raised
            avail_ok, reason = False, f"probe() raised {type(exc).__name__}: {exc}"
        else:
            avail_ok, reason = avail.available, avail.reason
        missing = sorted(m.value for m in wanted - cls.mem_types)
        if not avail_ok:
            passed.append(f"{cls.name} is unavailable: {reason}")
        elif missing:
            passed.append(f"{cls.name} cannot register {'/'.join(missing)}")
        elif remote and not cls.supports_remote:
            passed.append(f"{cls.name} cannot reach other agents")
        elif not remote and not cls.supports_local:
            passed.append(f"{cls.name} does no loopback transfers")
        else:
            why = f"{cls.name} is available here" if not passed else "; ".join(passed)
            return cls.name, why
    raise NotFoundError(
        f"no installed backend can move {'/'.join(sorted(m.value for m in wanted))} "
        f"{'between agents' if remote else 'within an agent'}: " + "; ".join(passed)
    )


def format_backends(infos: Sequence[BackendInfo], params: bool = False) -> str:
    """A human-readable table of :func:`list_backends` (with ``params``: each backend's params)."""
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
    out = [_table(rows)]
    notes = [(b.name, n) for b in infos for n in b.notes]
    if notes:
        out.append("")
        out.extend(f"note: {name}: {n}" for name, n in notes)
    if params:
        for b in infos:
            if not b.params:
                continue
            out.append("")
            out.append(f"{b.name} params (precedence: explicit > AgentConfig > env > default)")
            prow = [("param", "type", "default", "env", "value now", "source", "accepts", "doc")]
            prow.extend(
                (p.name, p.kind, p.default, p.env, p.value, p.source, p.accepted, p.doc)
                for p in b.params
            )
            out.append(_table(prow))
    return "\n".join(out)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
    return "\n".join(lines)
