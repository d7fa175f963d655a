"""Type stubs of the native module ``hci._hci`` (Rust, pyo3)."""

import builtins
from datetime import datetime
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Iterator, final


__version__: str
__all__ = [
    "__version__",
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
    "_raise_core_error",
    "_raise_status",
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
    "RawClient",
    "WatchStream",
    "ConsoleStream",
    "validate_json",
    "parse_yaml",
    "to_yaml",
    "kinds",
]

# -- errors -----------------------------------------------------------------

class HciError(Exception):
    """Base class of every error raised by hci."""

class NotFound(HciError):
    """The named resource does not exist."""

class Conflict(HciError):
    """Someone else changed the resource, or it exists already."""

class AlreadyExists(Conflict):
    """A resource with that name already exists."""

class InvalidSpec(HciError):
    """The request or document is invalid; the message names every offending field."""

class OutOfRange(HciError):
    """An I/O range lies outside the device, or watched history was compacted."""

class FailedPrecondition(HciError):
    """The resource is not in a state that allows the operation."""

class ReadOnly(FailedPrecondition):
    """A write was attempted on a read-only volume or export."""

class Busy(FailedPrecondition):
    """The resource is in use."""

class Fenced(FailedPrecondition):
    """A newer writer holds the resource."""

class Unsupported(HciError):
    """The operation is not supported here."""

class Unavailable(HciError):
    """A dependency is unreachable or timed out; retrying may help."""

class PermissionDenied(HciError):
    """The caller lacks the rights."""

class Corrupt(HciError):
    """Data failed an integrity check."""

class Cancelled(HciError):
    """The operation was cancelled."""

def _raise_core_error(kind: str, message: str = "test") -> None:
    """Raises the exception an hci error of ``kind`` maps to (for tests)."""

def _raise_status(code: int, message: str = "test") -> None:
    """Raises the exception gRPC status ``code`` maps to (for tests)."""

# -- resources --------------------------------------------------------------

def validate_json(json: str) -> str:
    """Parses and validates one JSON document; returns it normalized."""

def parse_yaml(text: str) -> list[str]:
    """Parses and validates a YAML stream; returns each document as JSON."""

def to_yaml(json: str) -> str:
    """Renders one JSON document as YAML."""

def kinds() -> list[str]:
    """The resource kinds the model knows."""

# -- volumes ----------------------------------------------------------------

@final
class VolumeInfo:
    """What the store knows about one volume."""

    @property
    def name(self) -> str:
        """Volume name."""
    @property
    def size(self) -> int:
        """Size in bytes."""
    @property
    def allocated(self) -> int:
        """Bytes allocated across the head and every snapshot."""
    @property
    def snapshots(self) -> int:
        """Number of snapshots."""
    @property
    def encrypted(self) -> bool:
        """Whether data is encrypted at rest."""
    @property
    def revision(self) -> int:
        """Revision bumped by every metadata change."""

@final
class SnapshotInfo:
    """One snapshot of a volume."""

    @property
    def name(self) -> str:
        """Snapshot name."""
    @property
    def created(self) -> datetime:
        """When it was taken (UTC)."""
    @property
    def size(self) -> int:
        """Volume size when it was taken."""
    @property
    def allocated(self) -> int:
        """Bytes allocated in this snapshot's own layer."""

@final
class Extent:
    """A contiguous byte range with one allocation state."""

    @property
    def offset(self) -> int:
        """Start, in bytes."""
    @property
    def length(self) -> int:
        """Length, in bytes."""
    @property
    def kind(self) -> str:
        """``"data"``, ``"zero"`` or ``"hole"``."""
    @property
    def reads_zero(self) -> bool:
        """True if the range reads as zeroes."""

@final
class NetworkInfo:
    """One network as it exists on this host."""

    name: str
    bridge: str
    ports: list[str]
    dhcp_running: bool

@final
class Networks:
    """This host's bridges, NAT, overlays and DHCP servers (needs CAP_NET_ADMIN)."""

    def __new__(cls, state_dir: str | PathLike[str] | None = None) -> Networks: ...
    def ensure(self, network_json: str) -> NetworkInfo:
        """Creates or updates the network a Network resource (JSON) describes."""
    def remove(self, name: str) -> None:
        """Removes a network and everything made for it."""
    def list(self) -> builtins.list[NetworkInfo]:
        """The networks made here."""
    def attach_port(self, network: str, port: str, mac: str) -> str:
        """Creates a TAP port; returns its interface name."""
    def detach_port(self, network: str, port: str) -> None:
        """Removes a port."""

@final
class NbdExport:
    """A running NBD export of a volume."""

    @property
    def uri(self) -> str:
        """The NBD URI clients connect to."""
    @property
    def export_name(self) -> str:
        """The export name."""
    @property
    def address(self) -> tuple[str, int] | None:
        """The bound (host, port) for TCP listeners."""
    def stop(self) -> None:
        """Stops accepting connections."""
    def __enter__(self) -> NbdExport: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...

@final
class VolumeHandle:
    """An open volume (or read-only snapshot): byte-addressed block I/O."""

    @property
    def name(self) -> str:
        """The volume's name."""
    @property
    def snapshot_name(self) -> str | None:
        """The snapshot this handle reads, or None for the head."""
    @property
    def size(self) -> int:
        """Size in bytes."""
    @property
    def read_only(self) -> bool:
        """True if writes are refused."""
    @property
    def closed(self) -> bool:
        """True once closed."""
    def read(self, offset: int, length: int) -> bytes:
        """Reads ``length`` bytes at ``offset``."""
    def write(self, offset: int, data: bytes | bytearray, *, fua: bool = False) -> None:
        """Writes ``data`` at ``offset``."""
    def flush(self) -> None:
        """Makes every completed write durable."""
    def discard(self, offset: int, length: int) -> None:
        """Marks the range unused."""
    def write_zeroes(
        self, offset: int, length: int, *, no_hole: bool = False, fua: bool = False
    ) -> None:
        """Makes the range read as zeroes."""
    def block_status(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """How the range is backed."""
    def snapshot(self, snapshot: str) -> SnapshotInfo:
        """Takes a snapshot."""
    def snapshots(self) -> list[SnapshotInfo]:
        """Lists snapshots, oldest first."""
    def revert(self, snapshot: str) -> None:
        """Reverts to a snapshot."""
    def clone(self, snapshot: str, new_name: str) -> VolumeInfo:
        """Creates a volume from a snapshot."""
    def expand(self, new_size: int) -> VolumeInfo:
        """Grows the volume."""
    def info(self) -> VolumeInfo:
        """Describes the volume."""
    def export_nbd(
        self,
        listen: str = "127.0.0.1:0",
        *,
        export_name: str | None = None,
        read_only: bool = False,
        description: str = "",
    ) -> NbdExport:
        """Serves the volume over NBD."""
    def _bench_rust_writes(
        self, count: int, block_size: int = 4096, span: int = ...
    ) -> float:
        """Rust-side write loop for the binding-overhead benchmark; seconds."""
    def replica_status(self) -> tuple[str, list[tuple[str, str]]] | None:
        """Robustness and replica states of a replicated volume; None otherwise."""
    def close(self) -> None:
        """Drops the handle."""
    def __enter__(self) -> VolumeHandle: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...

@final
class ReplicaServer:
    """Serves the replicas in a directory to engines over TCP."""

    def __new__(
        cls, root: str | PathLike[str], token: bytes, *, listen: str = "127.0.0.1:0"
    ) -> ReplicaServer: ...
    @property
    def address(self) -> str:
        """Where it listens (``HOST:PORT``)."""
    def close(self) -> None:
        """Stops accepting connections (connected engines are still served)."""
    def __enter__(self) -> ReplicaServer: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...

@final
class VolumeStore:
    """A directory of local thin volumes with O(1) snapshots, or replicated volumes."""

    def __new__(cls, root: str | PathLike[str]) -> VolumeStore: ...
    @staticmethod
    def replicated(replicas: list[str], token: bytes, *, timeout: float = 3.0) -> VolumeStore:
        """A store whose volumes have one replica on each replica server or directory."""
    @property
    def root(self) -> Path:
        """The store's directory (local stores only)."""
    @property
    def is_replicated(self) -> bool:
        """Whether volumes here are replicated."""
    def create(
        self, name: str, size: int, *, encryption_key: bytes | None = None
    ) -> VolumeInfo:
        """Creates an empty volume."""
    def open(
        self, name: str, *, read_only: bool = False, encryption_key: bytes | None = None
    ) -> VolumeHandle:
        """Opens a volume for block I/O."""
    def open_snapshot(
        self, name: str, snapshot: str, *, encryption_key: bytes | None = None
    ) -> VolumeHandle:
        """Opens a snapshot read-only."""
    def info(self, name: str) -> VolumeInfo:
        """Describes a volume."""
    def list(self) -> list[VolumeInfo]:
        """Lists volumes by name."""
    def delete(self, name: str) -> None:
        """Deletes a volume and its snapshots."""
    def snapshot(self, name: str, snapshot: str) -> SnapshotInfo:
        """Takes a snapshot."""
    def snapshots(self, name: str) -> builtins.list[SnapshotInfo]:
        """Lists snapshots, oldest first."""
    def delete_snapshot(self, name: str, snapshot: str) -> None:
        """Deletes a snapshot."""
    def revert(self, name: str, snapshot: str) -> None:
        """Reverts a volume to a snapshot."""
    def clone(self, name: str, snapshot: str, new_name: str) -> VolumeInfo:
        """Creates a volume from a snapshot."""
    def expand(self, name: str, new_size: int) -> VolumeInfo:
        """Grows a volume."""
    def changed_blocks(
        self, name: str, from_snapshot: str | None, to_snapshot: str
    ) -> builtins.list[tuple[int, int]]:
        """(offset, length) ranges changed between two snapshots."""
    def release(self, name: str) -> None:
        """Releases this process's hold on a volume."""

# -- backups ----------------------------------------------------------------

@final
class BackupInfo:
    """A finished backup."""

    @property
    def id(self) -> str:
        """Backup id."""
    @property
    def volume(self) -> str:
        """Source volume."""
    @property
    def snapshot(self) -> str:
        """Source snapshot."""
    @property
    def size(self) -> int:
        """Volume size in bytes."""
    @property
    def created(self) -> datetime:
        """When taken (UTC)."""
    @property
    def base(self) -> str | None:
        """Base backup id for incrementals."""
    @property
    def added_bytes(self) -> int:
        """Bytes newly stored on the target."""
    @property
    def metadata(self) -> dict[str, str]:
        """Stored metadata."""

@final
class VerifyReport:
    """The result of verifying a backup."""

    @property
    def chunks_checked(self) -> int:
        """Pieces checked."""
    @property
    def bad_chunks(self) -> list[str]:
        """Pieces missing or corrupt."""
    @property
    def ok(self) -> bool:
        """True if every piece is intact."""
    def __bool__(self) -> bool: ...

@final
class BackupRepository:
    """A backup repository on a file:// or s3:// target."""

    @staticmethod
    def init(url: str, *, key: bytes | None = None) -> BackupRepository:
        """Creates a repository on an empty target."""
    @staticmethod
    def open(url: str, *, key: bytes | None = None) -> BackupRepository:
        """Opens an existing repository."""
    @property
    def url(self) -> str:
        """The target URL."""
    def backup(
        self,
        store: VolumeStore,
        volume: str,
        snapshot: str,
        *,
        base: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> BackupInfo:
        """Backs up a volume snapshot (incrementally with ``base``)."""
    def restore(self, backup_id: str, volume: VolumeHandle) -> None:
        """Writes a backup onto a volume, verifying every piece."""
    def list(self) -> list[BackupInfo]:
        """Lists backups, oldest first."""
    def verify(self, backup_id: str) -> VerifyReport:
        """Checks every piece of a backup."""
    def delete(self, backup_id: str) -> None:
        """Deletes a backup."""
    def prune(
        self,
        *,
        keep_last: int = 0,
        keep_daily: int = 0,
        keep_weekly: int = 0,
        keep_monthly: int = 0,
    ) -> builtins.list[str]:
        """Deletes backups the retention policy does not keep."""
    def gc(self) -> int:
        """Reclaims unused packs; returns the bytes deleted."""

# -- daemon client ----------------------------------------------------------

@final
class WatchStream:
    """Low-level watch stream of (type, name, json, resource_version, revision)."""

    def next(self, timeout: float | None = None) -> tuple[str, str, str, int, int] | None:
        """The next event, or None on timeout or end."""
    def close(self) -> None:
        """Ends the watch."""
    def __iter__(self) -> Iterator[tuple[str, str, str, int, int]]: ...
    def __next__(self) -> tuple[str, str, str, int, int]: ...

@final
class ConsoleStream:
    """Low-level console session."""

    def read(self, timeout: float | None = None) -> bytes | None:
        """The next output chunk (b"" on timeout, None at the end)."""
    def write(self, data: bytes | bytearray) -> None:
        """Sends keystrokes."""
    def close(self) -> None:
        """Closes the session."""
    def __iter__(self) -> Iterator[bytes]: ...
    def __next__(self) -> bytes: ...
    def __enter__(self) -> ConsoleStream: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...

@final
class RawClient:
    """Low-level daemon client: resources as (json, resource_version)."""

    def __new__(
        cls, server: str, *, token: str | None = None, ca_pem: bytes | None = None
    ) -> RawClient: ...
    @property
    def server(self) -> str:
        """The server address."""
    def get(self, kind_name: str, name: str) -> tuple[str, int]:
        """Reads one resource."""
    def list(
        self, kind_name: str, labels: dict[str, str] | None = None
    ) -> tuple[list[tuple[str, int]], int]:
        """Lists resources and the store revision."""
    def create(self, kind_name: str, json: str) -> tuple[str, int]:
        """Creates a resource."""
    def update(self, kind_name: str, json: str, resource_version: int = 0) -> tuple[str, int]:
        """Updates a resource."""
    def delete(self, kind_name: str, name: str, resource_version: int = 0) -> int:
        """Deletes a resource; returns the revision."""
    def watch(
        self, kind_name: str, name: str | None = None, from_revision: int = 0
    ) -> WatchStream:
        """Follows changes."""
    def vm_action(self, action: str, name: str, resource_version: int = 0) -> tuple[str, int]:
        """start, stop, restart, pause or resume a VM."""
    def migrate_vm(
        self, name: str, target_node: str = "", cancel: bool = False, resource_version: int = 0
    ) -> tuple[str, int]:
        """Asks for (or cancels) a VM's live migration."""
    def snapshot_volume(
        self, volume: str, snapshot: str, labels: dict[str, str] | None = None
    ) -> tuple[str, int]:
        """Snapshots a volume."""
    def clone_volume(self, volume: str, name: str) -> tuple[str, int]:
        """Clones a volume."""
    def expand_volume(
        self, volume: str, size: int, resource_version: int = 0
    ) -> tuple[str, int]:
        """Expands a volume."""
    def restore_backup(
        self, backup: str, volume: str, size: int = 0, vm: str = ""
    ) -> tuple[str, int]:
        """Restores a backup into a new volume, or a VM backup as a new VM."""
    def restore_vm_snapshot(self, snapshot: str, vm: str) -> tuple[str, int]:
        """Restores a VirtualMachineSnapshot as a new VM."""
    def console(self, name: str) -> ConsoleStream:
        """Attaches to a VM's serial console."""
