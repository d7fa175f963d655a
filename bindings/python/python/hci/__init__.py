"""hci: the Python SDK of the hci hyperconverged-infrastructure SDK.

In-process (no daemon needed):

- :class:`VolumeStore` / :class:`VolumeHandle`: local thin volumes with O(1)
  snapshots, revert, clone, expand, block status and NBD export;
- :class:`VolumeStore.replicated` / :class:`ReplicaServer`: volumes
  replicated synchronously over replica servers;
- :class:`BackupRepository`: deduplicated, compressed, optionally encrypted
  backups on ``file://`` or ``s3://`` targets;
- :class:`Networks`: this host's bridges, NAT, overlays and DHCP servers
  (with CAP_NET_ADMIN).

As a client of ``hci-daemon``: :class:`Client`, with every resource kind as
a typed object (:class:`VirtualMachine`, :class:`Volume`, :class:`Network`,
…), watch iterators, VM power actions and the serial console.

Errors are subclasses of :class:`HciError` (:class:`NotFound`,
:class:`Conflict`, :class:`InvalidSpec`, :class:`Unavailable`,
:class:`PermissionDenied`, …) and carry the Rust error's message.
"""

from ._hci import (
    AlreadyExists,
    BackupInfo,
    BackupRepository,
    Busy,
    Cancelled,
    Conflict,
    Corrupt,
    Extent,
    FailedPrecondition,
    Fenced,
    HciError,
    InvalidSpec,
    NbdExport,
    NetworkInfo,
    Networks,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ReadOnly,
    ReplicaServer,
    SnapshotInfo,
    Unavailable,
    Unsupported,
    VerifyReport,
    VolumeHandle,
    VolumeInfo,
    VolumeStore,
    __version__,
)
from . import aio
from .client import DEFAULT_SERVER, Client, Console, Watch, WatchEvent
from .resources import (
    API_VERSION,
    KINDS,
    Backup,
    BackupTarget,
    Image,
    Network,
    Node,
    ObjectMeta,
    Resource,
    Schedule,
    Snapshot,
    VirtualMachine,
    VirtualMachineSnapshot,
    Volume,
    from_dict,
    load_yaml,
)

__all__ = [
    "__version__",
    "aio",
    # errors
    "HciError",
    "NotFound",
    "Conflict",
    "AlreadyExists",
    "InvalidSpec",
    "OutOfRange",
    "FailedPrecondition",
    "ReadOnly",
    "Busy",
    "Fenced",
    "Unsupported",
    "Unavailable",
    "PermissionDenied",
    "Corrupt",
    "Cancelled",
    # in-process
    "VolumeStore",
    "VolumeHandle",
    "VolumeInfo",
    "SnapshotInfo",
    "Extent",
    "NbdExport",
    "ReplicaServer",
    "Networks",
    "NetworkInfo",
    "BackupRepository",
    "BackupInfo",
    "VerifyReport",
    # daemon client
    "Client",
    "Console",
    "Watch",
    "WatchEvent",
    "DEFAULT_SERVER",
    # resources
    "API_VERSION",
    "KINDS",
    "ObjectMeta",
    "Resource",
    "VirtualMachine",
    "Volume",
    "Image",
    "Network",
    "Snapshot",
    "VirtualMachineSnapshot",
    "Backup",
    "BackupTarget",
    "Schedule",
    "Node",
    "from_dict",
    "load_yaml",
]
