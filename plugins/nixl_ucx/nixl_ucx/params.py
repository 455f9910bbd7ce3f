"""UCX backend parameters: the declaration table (NIXL's names; aliases for its other spellings).

The core resolves them (explicit > ``AgentConfig`` > ``NIXL_UCX_<PARAM>`` > default, see
:mod:`nixl_core.params`); :class:`UcxConfig` is the typed view the backend reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from nixl_core.params import Param

__all__ = ["PARAMS", "UcxConfig"]


def _pairs(value: Any) -> tuple[tuple[str, str], ...]:
    """``KEY=VAL,KEY=VAL`` (or a mapping) -> ((KEY, VAL), ...), without a ``UCX_`` prefix."""
    if isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        return value
    if isinstance(value, Mapping):
        items = [(str(k), str(v)) for k, v in value.items()]
    elif isinstance(value, str):
        items = []
        for raw in value.split(","):
            part = raw.strip()
            if not part:
                continue
            key, sep, val = part.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"KEY=VALUE pairs ({part!r} is not one; e.g. 'RNDV_THRESH=inf')")
            items.append((key.strip(), val.strip()))
    else:
        raise ValueError("KEY=VALUE pairs separated by commas, or a mapping")
    out = []
    for key, val in items:
        upper = key.upper()
        out.append((upper[4:] if upper.startswith("UCX_") else upper, val))
    return tuple(out)


PARAMS: tuple[Param, ...] = (
    Param.integer(
        "num_workers",
        1,
        "UCP workers (one endpoint per worker and peer); requests round-robin, big batches split",
        minimum=1,
        maximum=64,
    ),
    Param.integer(
        "num_threads",
        0,
        "NIXL's thread-pool size: > 0 raises num_workers to at least this, progress threads on",
        minimum=0,
        maximum=64,
    ),
    Param.boolean(
        "progress_thread",
        True,
        "a C progress thread per worker (completions, notifications, wire-up without polling)",
    ),
    Param.choice(
        "ucx_error_handling_mode",
        "peer",
        ("peer", "none"),
        "peer: a dead peer fails its requests; none: more transports, failures unseen",
        aliases=("error_handling_mode",),
    ),
    Param.string(
        "device_list",
        "",
        "UCX devices (UCX_NET_DEVICES), e.g. eth0 or mlx5_0:1; empty = all",
        aliases=("ucx_devices",),
    ),
    Param.string(
        "transports",
        "",
        "UCX transport list (UCX_TLS), e.g. tcp or cma,sm,tcp; empty = UCX's choice",
        aliases=("ucx_transports", "tls"),
    ),
    Param.integer(
        "split_batch_size",
        1024,
        "with progress threads, requests of at least this many descriptors are split over workers",
        minimum=1,
    ),
    Param.custom(
        "engine_config",
        (),
        "more UCX options KEY=VAL,KEY=VAL (UCX_ prefix optional), applied with ucp_config_modify",
        _pairs,
        "KEY=VALUE pairs separated by commas",
    ),
)


@attrs.frozen
class UcxConfig:
    """The resolved UCX parameters, typed.

    Attributes:
        num_workers: UCP workers.
        num_threads: NIXL's thread-pool size.
        progress_thread: progress threads on.
        error_handling_mode: ``peer`` or ``none``.
        device_list: UCX devices, "" = all.
        transports: UCX transports, "" = UCX's choice.
        split_batch_size: descriptors from which a request is split over the workers.
        engine_config: extra UCX options.
    """

    num_workers: int
    num_threads: int
    progress_thread: bool
    error_handling_mode: str
    device_list: str
    transports: str
    split_batch_size: int
    engine_config: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> UcxConfig:
        """The typed view of resolved parameters."""
        return cls(
            num_workers=params["num_workers"],
            num_threads=params["num_threads"],
            progress_thread=params["progress_thread"],
            error_handling_mode=params["ucx_error_handling_mode"],
            device_list=params["device_list"],
            transports=params["transports"],
            split_batch_size=params["split_batch_size"],
            engine_config=params["engine_config"],
        )

    @property
    def workers(self) -> int:
        """Effective number of workers."""
        return max(self.num_workers, self.num_threads)

    @property
    def threads(self) -> bool:
        """Whether the workers run progress threads."""
        return self.progress_thread or self.num_threads > 0
