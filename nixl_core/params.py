"""Backend parameters: declared once per backend, resolved once by the core.

A backend declares its parameters as a tuple of :class:`Param` in ``Backend.param_specs``:
name, kind, default, a one-line doc, and the values it accepts. Nothing else parses them: the
core resolves every parameter of a backend when the agent creates it, and the backend receives
a :class:`ResolvedParams` (typed values) as ``params``::

    class MyBackend(Backend):
        name = "MINE"
        param_specs = (
            Param.integer("num_threads", 1, "worker threads", minimum=1),
            Param.boolean("pin", True, "pin host buffers"),
            Param.choice("mode", "auto", ("auto", "fast", "safe"), "how to move bytes"),
        )

        def __init__(self, agent_name, params):
            super().__init__(agent_name, params)
            self._threads = self.params["num_threads"]     # an int, already checked

Precedence, highest first (one rule for every backend):

1. **explicit**: ``Agent.create_backend(name, params)``;
2. **config**: ``AgentConfig.backend_params[name]``, then the agent-wide ``AgentConfig`` fields
   (``num_threads`` > 0 and ``enable_prog_thread`` when set) for backends that declare a
   parameter of that name (``num_threads``, ``progress_thread``);
3. **env**: ``NIXL_<BACKEND>_<PARAM>`` (e.g. ``NIXL_UCX_NUM_WORKERS``);
4. **default**: the declaration's default.

A value given at a higher level wins even when it equals the default. Values may be typed or
strings (NIXL passes strings): booleans accept ``true/false, 1/0, yes/no, on/off``; integers
accept decimal, ``0x`` hex and ``_`` separators. A bad value raises
:class:`~nixl_core.errors.InvalidParamError` naming the backend, the parameter (or the
environment variable), the value and what is accepted; an unknown name raises it with the
closest known names. ``python -m nixl_core backends --params`` lists every backend's
parameters with their defaults, environment variables and where the value would come from now.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs

from nixl_core.errors import InvalidParamError

__all__ = ["Param", "ResolvedParams", "env_var", "resolve_params"]

_TRUE = frozenset({"1", "true", "yes", "on", "y", "enable", "enabled"})
_FALSE = frozenset({"0", "false", "no", "off", "n", "disable", "disabled"})


class _RejectedError(ValueError):
    """Raised by a converter: the value is not acceptable (the message says what is)."""


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        s = value.strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
    raise _RejectedError("a boolean (true/false, 1/0, yes/no, on/off)")


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _RejectedError("an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip(), 0)
        except ValueError:
            pass
    raise _RejectedError("an integer")


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    raise _RejectedError("a string")


@attrs.frozen
class Param:
    """One backend parameter.

    Build them with :meth:`integer`, :meth:`boolean`, :meth:`string`, :meth:`choice` or :meth:`custom`.

    Attributes:
        name: the name users write (lower case), e.g. ``"num_workers"``.
        kind: ``"int"``, ``"bool"``, ``"str"`` or ``"custom"`` (for listings).
        default: the typed default value.
        doc: one line saying what it does.
        accepted: what values are accepted, as shown in errors and listings.
        convert: turns a typed value or a string into the typed value; raises ``ValueError``
            (its message says what is accepted) for a bad one.
        aliases: other names accepted for it (e.g. NIXL's spellings).
        display: how the default is written as a string (NIXL's ``get_plugin_params``).
    """

    name: str
    kind: str
    default: Any
    doc: str
    accepted: str
    convert: Callable[[Any], Any] = attrs.field(repr=False)
    aliases: tuple[str, ...] = ()
    display: str = ""

    @classmethod
    def integer(
        cls,
        name: str,
        default: int,
        doc: str,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
        multiple_of: int = 1,
        aliases: tuple[str, ...] = (),
    ) -> Param:
        """An integer parameter, optionally bounded (inclusive) and a multiple of a step."""
        parts = ["an integer"]
        if minimum is not None and maximum is not None:
            parts.append(f"in {minimum}..{maximum}")
        elif minimum is not None:
            parts.append(f">= {minimum}")
        elif maximum is not None:
            parts.append(f"<= {maximum}")
        if multiple_of > 1:
            parts.append(f"and a multiple of {multiple_of}")
        accepted = " ".join(parts)

        def convert(value: Any) -> int:
            v = _to_int(value)
            if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
                raise _RejectedError(accepted)
            if v % multiple_of:
                raise _RejectedError(accepted)
            return v

        try:
            convert(default)
        except ValueError as exc:
            raise ValueError(f"default of {name} is not {accepted}") from exc
        return cls(name, "int", default, doc, accepted, convert, aliases, str(default))

    @classmethod
    def boolean(cls, name: str, default: bool, doc: str, *, aliases: tuple[str, ...] = ()) -> Param:
        """A boolean parameter."""
        return cls(
            name,
            "bool",
            default,
            doc,
            "a boolean (true/false, 1/0, yes/no, on/off)",
            _to_bool,
            aliases,
            "true" if default else "false",
        )

    @classmethod
    def string(cls, name: str, default: str, doc: str, *, aliases: tuple[str, ...] = ()) -> Param:
        """A free-form string parameter (leading and trailing blanks are stripped)."""
        return cls(name, "str", default, doc, "a string", _to_str, aliases, default)

    @classmethod
    def choice(
        cls,
        name: str,
        default: str,
        choices: Sequence[str],
        doc: str,
        *,
        aliases: tuple[str, ...] = (),
    ) -> Param:
        """A string parameter with a fixed set of values (compared case-insensitively)."""
        allowed = tuple(c.lower() for c in choices)
        accepted = "one of " + ", ".join(allowed)

        def convert(value: Any) -> str:
            v = _to_str(value).lower()
            if v not in allowed:
                raise _RejectedError(accepted)
            return v

        if default.lower() not in allowed:
            raise ValueError(f"default of {name} is not {accepted}")
        return cls(name, "str", default.lower(), doc, accepted, convert, aliases, default.lower())

    @classmethod
    def custom(
        cls,
        name: str,
        default: Any,
        doc: str,
        convert: Callable[[Any], Any],
        accepted: str,
        *,
        display: str = "",
        aliases: tuple[str, ...] = (),
    ) -> Param:
        """A parameter with its own converter (which raises ``ValueError`` for a bad value)."""
        return cls(name, "custom", default, doc, accepted, convert, aliases, display)

    def parse(self, value: Any, backend: str, where: str = "") -> Any:
        """The typed value of ``value``.

        Raises:
            InvalidParamError: not acceptable (names the backend, parameter, value and what
                is accepted; ``where`` says where the value came from, e.g. an env var).
        """
        try:
            return self.convert(value)
        except (ValueError, TypeError) as exc:
            src = f" (from {where})" if where else ""
            raise InvalidParamError(
                f"{backend} param {self.name}={value!r}{src}: expected {exc or self.accepted}",
                param=self.name,
                value=value,
            ) from None


def env_var(backend: str, param: str) -> str:
    """The environment variable of a parameter: ``NIXL_<BACKEND>_<PARAM>``."""
    return f"NIXL_{backend.upper()}_{param.upper()}"


class ResolvedParams(Mapping[str, Any]):
    """A backend's parameters after precedence: name -> typed value, plus where each came from.

    Read-only. ``source(name)`` is ``"explicit"``, ``"config"``, ``"env NIXL_..."`` or
    ``"default"``.
    """

    __slots__ = ("_sources", "_values")

    def __init__(self, values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
        self._values = dict(values)
        self._sources = dict(sources)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"ResolvedParams({self._values!r})"

    def source(self, name: str) -> str:
        """Where the value of ``name`` came from."""
        return self._sources[name]

    def as_strings(self) -> dict[str, str]:
        """Every value as a string (NIXL's ``get_backend_params`` shape)."""
        return {k: _display(v) for k, v in self._values.items()}


def _display(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _canonical(
    specs: Mapping[str, Param], aliases: Mapping[str, str], backend: str, key: object, layer: str
) -> str:
    if not isinstance(key, str):
        raise InvalidParamError(f"{backend} param names must be strings, got {key!r} ({layer})")
    low = key.strip().lower()
    name = aliases.get(low, low)
    if name in specs:
        return name
    known = sorted(specs)
    close = difflib.get_close_matches(low, known + sorted(aliases), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(aliases.get(c, c)) for c in close)}?" if close else ""
    listed = ", ".join(known) if known else "none"
    raise InvalidParamError(
        f"unknown {backend} param {key!r} ({layer}){hint} (known: {listed})", param=key
    )


def resolve_params(
    backend: str,
    specs: Sequence[Param],
    explicit: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    agent_wide: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> ResolvedParams:
    """Apply the precedence rule (module docstring) to one backend's parameters.

    Args:
        backend: the backend's name (for messages and environment variable names).
        specs: the backend's declarations.
        explicit: values passed to ``create_backend``.
        config: ``AgentConfig.backend_params`` for this backend.
        agent_wide: agent-wide config values (``num_threads``, ``progress_thread``); applied
            only to parameters the backend declares, unknown names are ignored.
        env: the environment (``os.environ`` when None).

    Raises:
        InvalidParamError: an unknown name in ``explicit`` or ``config`` (with close matches),
            or a bad value (names the parameter, value, source and what is accepted).
    """
    by_name = {p.name: p for p in specs}
    aliases = {a: p.name for p in specs for a in p.aliases}
    env = os.environ if env is None else env
    layers: list[tuple[str, dict[str, Any]]] = []
    for layer, given in (("explicit", explicit), ("config", config)):
        picked: dict[str, Any] = {}
        for key, value in (given or {}).items():
            picked[_canonical(by_name, aliases, backend, key, layer)] = value
        layers.append((layer, picked))
    wide = {k: v for k, v in (agent_wide or {}).items() if k in by_name}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, spec in by_name.items():
        for layer, picked in (layers[0], layers[1], ("config", wide)):
            if name in picked:
                values[name] = spec.parse(picked[name], backend, f"{layer} params")
                sources[name] = layer
                break
        else:
            var = env_var(backend, name)
            raw = env.get(var)
            if raw is not None:
                values[name] = spec.parse(raw, backend, f"environment variable {var}")
                sources[name] = f"env {var}"
            else:
                values[name] = spec.default
                sources[name] = "default"
    return ResolvedParams(values, sources)
