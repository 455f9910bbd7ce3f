"""The nixl-py error tree.

Every failure is an exception that names what went wrong and, where there is one, the offending
item (descriptor index, agent name, backend name, byte offset in a metadata blob). Each class also
subclasses the builtin that best describes it, so generic ``except ValueError`` code keeps working::

    NixlError (RuntimeError)                       status
     ├── PluginError
     │    ├── BackendNotFoundError (LookupError)    NOT_FOUND      unknown backend; carries an install hint
     │    ├── BackendUnavailableError               BACKEND        installed, but probe() said no
     │    └── DuplicateBackendError                 INVALID_PARAM  a second backend of one type
     ├── InvalidParamError (ValueError)             INVALID_PARAM
     │    ├── InvalidDescriptorError                INVALID_PARAM  descriptor outside registrations...
     │    ├── LengthMismatchError                   INVALID_PARAM  local/remote count or length differ
     │    └── RegistrationError                     INVALID_PARAM  duplicate/overlapping/unknown region
     ├── MemTypeError (TypeError)                   INVALID_PARAM  wrong or unknown memory type
     ├── NotFoundError (LookupError)                NOT_FOUND
     │    ├── UnknownAgentError                     NOT_FOUND      no metadata for that agent
     │    └── StaleHandleError                      NOT_FOUND      made against older metadata
     ├── MetadataError (ValueError)                 MISMATCH       truncated/corrupt/unknown version
     ├── MetadataStoreError                         BACKEND        metadata store unreachable or refused
     ├── NotAllowedError                            NOT_ALLOWED    e.g. changed blob for a known region
     ├── RepostActiveError                          REPOST_ACTIVE  post/release of a running request
     ├── NotPostedError                             NOT_POSTED     never posted, released, or no telemetry yet
     ├── NotSupportedError (NotImplementedError)    NOT_SUPPORTED  capability the backend lacks
     └── TransferError                              BACKEND        a transfer ended in ERROR
          ├── RemoteDisconnectError (ConnectionError) REMOTE_DISCONNECT
          ├── TransferCanceledError                 CANCELED
          └── TransferTimeoutError (TimeoutError)   BACKEND

:class:`Status` mirrors NIXL's ``nixl_status_t`` values; :func:`error_for_status` maps each error
code to its exception class (a meta-test checks the map is complete); ``ERR_NO_TELEMETRY`` maps to
:class:`NotPostedError`, which is what asking for the telemetry of a request that never completed
a post raises (nixl-py always records telemetry).

Backends raise these classes. An exception of any other type escaping a backend (a native error,
a bug) is turned by the core, at the backend boundary, into the typed error of the operation
(:class:`RegistrationError` for registration, :class:`TransferError` for a transfer,
:class:`PluginError` otherwise) naming the backend and the item, chained ``from`` the original:
see :func:`foreign_error`.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = [
    "BackendNotFoundError",
    "BackendUnavailableError",
    "DuplicateBackendError",
    "InvalidDescriptorError",
    "InvalidParamError",
    "LengthMismatchError",
    "MemTypeError",
    "MetadataError",
    "MetadataStoreError",
    "NixlError",
    "NotAllowedError",
    "NotFoundError",
    "NotPostedError",
    "NotSupportedError",
    "PluginError",
    "RegistrationError",
    "RemoteDisconnectError",
    "RepostActiveError",
    "StaleHandleError",
    "Status",
    "TransferCanceledError",
    "TransferError",
    "TransferTimeoutError",
    "UnknownAgentError",
    "error_for_status",
    "foreign_error",
]


class Status(enum.IntEnum):
    """NIXL's status codes (``nixl_status_t``), same values."""

    IN_PROG = 1
    SUCCESS = 0
    ERR_NOT_POSTED = -1
    ERR_INVALID_PARAM = -2
    ERR_BACKEND = -3
    ERR_NOT_FOUND = -4
    ERR_MISMATCH = -5
    ERR_NOT_ALLOWED = -6
    ERR_REPOST_ACTIVE = -7
    ERR_UNKNOWN = -8
    ERR_NOT_SUPPORTED = -9
    ERR_REMOTE_DISCONNECT = -10
    ERR_CANCELED = -11
    ERR_NO_TELEMETRY = -12


class NixlError(RuntimeError):
    """Base of every nixl-py error. ``status`` is the matching NIXL status code."""

    status: Status = Status.ERR_UNKNOWN


class PluginError(NixlError):
    """A backend plugin could not be found, loaded or created."""

    status = Status.ERR_BACKEND


class BackendNotFoundError(PluginError, LookupError):
    """No installed plugin provides the backend; the message carries an install hint."""

    status = Status.ERR_NOT_FOUND

    def __init__(
        self, name: str, hint: str | None = None, known: tuple[str, ...] = (), why: str = ""
    ) -> None:
        self.name = name
        self.hint = hint
        msg = f"unknown backend {name!r}"
        if known:
            msg += f" (installed: {', '.join(known)})"
        if why:
            msg += f"; {why}"
        if hint:
            msg += f"; install it with `{hint}`"
        super().__init__(msg)


class BackendUnavailableError(PluginError):
    """The backend's plugin is installed but cannot run here (its probe() gave the reason)."""

    status = Status.ERR_BACKEND


class DuplicateBackendError(PluginError):
    """The agent already has a backend of this type (NIXL allows one per type)."""

    status = Status.ERR_INVALID_PARAM


class InvalidParamError(NixlError, ValueError):
    """A parameter is invalid; the message names it.

    Attributes:
        param: the parameter's name, when one is at fault (backend params, config fields).
        value: the rejected value, when there is one.
    """

    status = Status.ERR_INVALID_PARAM

    def __init__(self, msg: str, *, param: str | None = None, value: Any = None) -> None:
        self.param = param
        self.value = value
        super().__init__(msg)


class InvalidDescriptorError(InvalidParamError):
    """A descriptor is malformed or lies outside every registration.

    Attributes:
        index: position of the first offending descriptor in its list, when there is one.
    """

    def __init__(self, msg: str, index: int | None = None) -> None:
        self.index = index
        super().__init__(msg)


class LengthMismatchError(InvalidParamError):
    """Local and remote lists differ in descriptor count or in a descriptor's length."""

    def __init__(self, msg: str, index: int | None = None) -> None:
        self.index = index
        super().__init__(msg)


class RegistrationError(InvalidParamError):
    """A registration overlaps an existing one, or a deregistration matches none."""

    def __init__(self, msg: str, index: int | None = None) -> None:
        self.index = index
        super().__init__(msg)


class MemTypeError(NixlError, TypeError):
    """A memory type is unknown, or not the one the operation needs."""

    status = Status.ERR_INVALID_PARAM


class NotFoundError(NixlError, LookupError):
    """Something named does not exist."""

    status = Status.ERR_NOT_FOUND


class UnregisteredDescriptorError(InvalidDescriptorError, NotFoundError):
    """A descriptor lies outside every registration of its side (NIXL's ``NOT_FOUND``).

    For a remote side this includes regions the peer has not published yet (partial metadata).
    """

    status = Status.ERR_NOT_FOUND


class UnknownAgentError(NotFoundError):
    """No metadata is loaded for the named remote agent."""

    def __init__(self, name: str, msg: str | None = None) -> None:
        self.name = name
        super().__init__(
            msg or f"unknown remote agent {name!r}: load its metadata with add_remote()"
        )


class StaleHandleError(UnknownAgentError):
    """A prepared list or request was made against a remote agent's metadata that has since
    been removed, invalidated (its store keys expired) or replaced (the agent restarted)."""

    def __init__(self, name: str, msg: str) -> None:
        super().__init__(name, msg)


class MetadataError(NixlError, ValueError):
    """Agent metadata is truncated, corrupt, or of an unsupported version.

    Attributes:
        offset: byte offset in the blob where decoding failed, when known.
    """

    status = Status.ERR_MISMATCH

    def __init__(self, msg: str, offset: int | None = None) -> None:
        self.offset = offset
        if offset is not None:
            msg = f"{msg} (at byte {offset})"
        super().__init__(msg)


class MetadataStoreError(NixlError):
    """The metadata store (etcd) could not be reached, timed out, or refused a request.

    The message names the endpoint(s) and the operation.

    Attributes:
        endpoint: the endpoint (or comma-separated endpoints) tried, when known.
        operation: what was being done ("publish", "get", "watch", ...), when known.
    """

    status = Status.ERR_BACKEND

    def __init__(
        self, msg: str, *, endpoint: str | None = None, operation: str | None = None
    ) -> None:
        self.endpoint = endpoint
        self.operation = operation
        super().__init__(msg)


class NotAllowedError(NixlError):
    """The operation is not allowed in the current state."""

    status = Status.ERR_NOT_ALLOWED


class RepostActiveError(NixlError):
    """The request is still in progress: it cannot be posted again or released yet."""

    status = Status.ERR_REPOST_ACTIVE


class NotPostedError(NixlError):
    """The request was never posted."""

    status = Status.ERR_NOT_POSTED


class NotSupportedError(NixlError, NotImplementedError):
    """The backend does not support this operation."""

    status = Status.ERR_NOT_SUPPORTED


class TransferError(NixlError):
    """A transfer ended in ERROR.

    Attributes:
        backend: name of the backend that carried the transfer, when known.
        request: the failed request object, when known.
    """

    status = Status.ERR_BACKEND

    def __init__(self, msg: str, *, backend: str | None = None, request: Any = None) -> None:
        self.backend = backend
        self.request = request
        super().__init__(msg)


class RemoteDisconnectError(TransferError, ConnectionError):
    """The remote agent went away during the transfer."""

    status = Status.ERR_REMOTE_DISCONNECT


class TransferCanceledError(TransferError):
    """The transfer was aborted before it completed."""

    status = Status.ERR_CANCELED


class TransferTimeoutError(TransferError, TimeoutError):
    """The transfer did not complete within its deadline."""


class MetadataTimeoutError(NotFoundError, TimeoutError):
    """A peer's metadata did not arrive within the fetch's timeout (or a wait gave up first)."""


_STATUS_TO_ERROR: dict[Status, type[NixlError]] = {
    Status.ERR_NOT_POSTED: NotPostedError,
    Status.ERR_INVALID_PARAM: InvalidParamError,
    Status.ERR_BACKEND: TransferError,
    Status.ERR_NOT_FOUND: NotFoundError,
    Status.ERR_MISMATCH: MetadataError,
    Status.ERR_NOT_ALLOWED: NotAllowedError,
    Status.ERR_REPOST_ACTIVE: RepostActiveError,
    Status.ERR_UNKNOWN: NixlError,
    Status.ERR_NOT_SUPPORTED: NotSupportedError,
    Status.ERR_REMOTE_DISCONNECT: RemoteDisconnectError,
    Status.ERR_CANCELED: TransferCanceledError,
    Status.ERR_NO_TELEMETRY: NotPostedError,
}


def error_for_status(status: Status) -> type[NixlError]:
    """Return the exception class for a NIXL error status.

    Raises:
        ValueError: if ``status`` is not an error (IN_PROG or SUCCESS).
    """
    try:
        return _STATUS_TO_ERROR[Status(status)]
    except KeyError:
        raise ValueError(f"{Status(status).name} is not an error status") from None


def foreign_error(
    exc: BaseException, backend: str, what: str, cls: type[NixlError] = PluginError
) -> NixlError:
    """The typed error for an exception that is not a :class:`NixlError`, raised by a backend.

    The core calls it at the backend boundary so that callers only ever see the error tree
    above; the result is chained to ``exc`` (``__cause__``) already.

    Args:
        exc: what the backend raised.
        backend: the backend's name.
        what: what the backend was asked to do, naming the item (e.g. "register DRAM regions
            0..3 [addr=0x7f..]").
        cls: the error class of the operation.
    """
    err = cls(f"backend {backend} failed to {what}: {type(exc).__name__}: {exc}")
    if isinstance(err, TransferError):
        err.backend = backend
    err.__cause__ = exc
    return err
