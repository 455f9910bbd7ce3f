"""UCX backend parameters: NIXL's names, string values accepted, ``NIXL_UCX_<PARAM>`` env vars.

Precedence: a value the caller passed wins; a parameter left at its advertised default takes
``NIXL_UCX_<NAME>`` from the environment when that is set. (The core merges the advertised
defaults into every backend's parameters, so a value equal to the default counts as "left".)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs

from nixl_core.errors import InvalidParamError

__all__ = ["DEFAULT_PARAMS", "UcxParams"]

#: Advertised parameters and their defaults (strings, as NIXL's ``get_plugin_params``).
DEFAULT_PARAMS: dict[str, str] = {
    "num_workers": "1",
    "num_threads": "0",
    "progress_thread": "true",
    "ucx_error_handling_mode": "peer",
    "device_list": "",
    "transports": "",
    "split_batch_size": "1024",
    "engine_config": "",
}

#: Other spellings accepted for a parameter (NIXL advertises ``ucx_devices`` but reads
#: ``device_list``; both are honoured here).
_ALIASES = {
    "ucx_devices": "device_list",
    "error_handling_mode": "ucx_error_handling_mode",
    "ucx_transports": "transports",
    "tls": "transports",
}

_TRUE = {"1", "y", "yes", "on", "true", "enable"}
_FALSE = {"0", "n", "no", "off", "false", "disable", ""}


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    s = str(value).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise InvalidParamError(f"UCX param {name}={value!r}: expected a boolean (yes/no, 1/0, ...)")


def _int(name: str, value: Any, minimum: int) -> int:
    try:
        out = int(str(value).strip(), 0) if not isinstance(value, int) else value
    except ValueError:
        raise InvalidParamError(f"UCX param {name}={value!r}: expected an integer") from None
    if out < minimum:
        raise InvalidParamError(f"UCX param {name}={out}: must be >= {minimum}")
    return out


def _pairs(name: str, value: Any) -> tuple[tuple[str, str], ...]:
    if isinstance(value, Mapping):
        items = [(str(k), str(v)) for k, v in value.items()]
    else:
        items = []
        for raw in str(value).split(","):
            part = raw.strip()
            if not part:
                continue
            key, sep, val = part.partition("=")
            if not sep or not key.strip():
                raise InvalidParamError(
                    f"UCX param {name}: {part!r} is not KEY=VALUE (e.g. 'RNDV_THRESH=inf')"
                )
            items.append((key.strip(), val.strip()))
    out = []
    for key, val in items:
        upper = key.upper()
        out.append((upper[4:] if upper.startswith("UCX_") else upper, val))
    return tuple(out)


@attrs.frozen
class UcxParams:
    """Parsed parameters of :class:`~nixl_ucx.backend.UcxBackend`.

    Attributes:
        num_workers: UCP workers (one endpoint per worker and peer); requests are spread over them
            round-robin and large batches are split across them.
        num_threads: NIXL's thread-pool size; > 0 raises ``num_workers`` to at least this and
            turns the progress threads on.
        progress_thread: each worker gets a C progress thread that sleeps on the worker's event
            fd (completions, notifications and wire-up progress without the user polling, and
            parallel posting of split batches). Off: progress happens in poll/wait/get_notifs.
        error_handling_mode: ``peer`` (a dead peer fails its requests) or ``none`` (more
            transports, failures unseen). Both agents must use the same.
        device_list: comma-separated UCX devices (``UCX_NET_DEVICES``), "" = all.
        transports: UCX transport list (``UCX_TLS``), "" = UCX's choice.
        split_batch_size: with progress threads, requests of at least this many descriptors are
            posted by the worker threads, split across workers; smaller ones inline.
        engine_config: extra UCX options ``KEY=VAL,KEY=VAL`` (the ``UCX_`` prefix is optional).
    """

    num_workers: int = 1
    num_threads: int = 0
    progress_thread: bool = True
    error_handling_mode: str = "peer"
    device_list: str = ""
    transports: str = ""
    split_batch_size: int = 1024
    engine_config: tuple[tuple[str, str], ...] = ()

    @property
    def workers(self) -> int:
        """Effective number of workers."""
        return max(self.num_workers, self.num_threads)

    @property
    def threads(self) -> bool:
        """Whether the workers run progress threads."""
        return self.progress_thread or self.num_threads > 0

    @classmethod
    def parse(cls, params: Mapping[str, Any], env: Mapping[str, str] | None = None) -> UcxParams:
        """Parse backend params (strings or typed values), with ``NIXL_UCX_*`` env fallbacks.

        Raises:
            InvalidParamError: an unknown parameter or a malformed value (named).
        """
        env = os.environ if env is None else env
        raw: dict[str, Any] = {}
        for key, value in params.items():
            name = _ALIASES.get(key.lower(), key.lower())
            if name not in DEFAULT_PARAMS:
                known = ", ".join(sorted(DEFAULT_PARAMS))
                raise InvalidParamError(f"unknown UCX param {key!r} (known: {known})")
            raw[name] = value
        for name, default in DEFAULT_PARAMS.items():
            given = raw.get(name)
            if given is None or str(given) == default:
                from_env = env.get(f"NIXL_UCX_{name.upper()}")
                raw[name] = default if from_env is None else from_env
        mode = str(raw["ucx_error_handling_mode"]).strip().lower()
        if mode not in ("peer", "none"):
            raise InvalidParamError(
                f"UCX param ucx_error_handling_mode={mode!r}: expected 'peer' or 'none'"
            )
        return cls(
            num_workers=_int("num_workers", raw["num_workers"], 1),
            num_threads=_int("num_threads", raw["num_threads"], 0),
            progress_thread=_bool("progress_thread", raw["progress_thread"]),
            error_handling_mode=mode,
            device_list=str(raw["device_list"]).strip(),
            transports=str(raw["transports"]).strip(),
            split_batch_size=_int("split_batch_size", raw["split_batch_size"], 1),
            engine_config=_pairs("engine_config", raw["engine_config"]),
        )
