"""nixl-py core: one agent API for one-sided READ/WRITE of descriptor lists.

Transports are plugins found through the ``nixl.backends`` entry-point group; the core ships the
reference LOOPBACK backend (same-host DRAM) so it works with no plugin installed.
"""

from nixl_core._plugins import (
    BackendInfo,
    BackendRegistry,
    default_backend,
    list_backends,
    reset_plugin_manager,
)
from nixl_core._version import __version__
from nixl_core.agent import INIT_AGENT, Agent, AgentConfig
from nixl_core.backend import (
    PLUGIN_API_VERSION,
    Availability,
    Backend,
    BackendRequest,
    XferOp,
    XferSide,
    XferStatus,
)
from nixl_core.descriptors import DescList, RegDescList, as_descs, as_reg_descs
from nixl_core.errors import (
    BackendNotFoundError,
    BackendUnavailableError,
    DuplicateBackendError,
    InvalidDescriptorError,
    InvalidParamError,
    LengthMismatchError,
    MemTypeError,
    MetadataError,
    MetadataStoreError,
    MetadataTimeoutError,
    NixlError,
    NotAllowedError,
    NotFoundError,
    NotPostedError,
    NotSupportedError,
    PluginError,
    RegistrationError,
    RemoteDisconnectError,
    RepostActiveError,
    StaleHandleError,
    Status,
    TransferCanceledError,
    TransferError,
    TransferTimeoutError,
    UnknownAgentError,
    UnregisteredDescriptorError,
)
from nixl_core.hookspecs import hookimpl
from nixl_core.host import HostIdentity
from nixl_core.memory import MemType
from nixl_core.params import Param, ResolvedParams
from nixl_core.xfer import KEEP, PreppedList, XferRequest, XferTelemetry

__all__ = [
    "INIT_AGENT",
    "KEEP",
    "PLUGIN_API_VERSION",
    "Agent",
    "AgentConfig",
    "Availability",
    "Backend",
    "BackendInfo",
    "BackendNotFoundError",
    "BackendRegistry",
    "BackendRequest",
    "BackendUnavailableError",
    "DescList",
    "DuplicateBackendError",
    "HostIdentity",
    "InvalidDescriptorError",
    "InvalidParamError",
    "LengthMismatchError",
    "MemType",
    "MemTypeError",
    "MetadataError",
    "MetadataStoreError",
    "MetadataTimeoutError",
    "NixlError",
    "NotAllowedError",
    "NotFoundError",
    "NotPostedError",
    "NotSupportedError",
    "Param",
    "PluginError",
    "PreppedList",
    "RegDescList",
    "RegistrationError",
    "RemoteDisconnectError",
    "RepostActiveError",
    "ResolvedParams",
    "StaleHandleError",
    "Status",
    "TransferCanceledError",
    "TransferError",
    "TransferTimeoutError",
    "UnknownAgentError",
    "UnregisteredDescriptorError",
    "XferOp",
    "XferRequest",
    "XferSide",
    "XferStatus",
    "XferTelemetry",
    "__version__",
    "as_descs",
    "as_reg_descs",
    "default_backend",
    "hookimpl",
    "list_backends",
    "reset_plugin_manager",
]
