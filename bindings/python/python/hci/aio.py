"""``asyncio`` variants of the long operations.

The native calls release the GIL while they run, so running them in
worker threads (:func:`asyncio.to_thread`) gives real concurrency: many
backups, restores or daemon calls can be awaited at once.

>>> async def main() -> None:                                    # doctest: +SKIP
...     client = await hci.aio.AsyncClient.connect("unix:///var/lib/hci/hci.sock")
...     vm = await client.wait_for_phase("web", "Running")
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Mapping, TypeVar

from . import _hci
from .client import Client
from .resources import Resource, VirtualMachine, VirtualMachineSnapshot

__all__ = ["AsyncClient", "backup", "restore", "verify"]

R = TypeVar("R", bound=Resource)


class AsyncClient:
    """An :class:`hci.Client` whose calls are awaitable."""

    def __init__(self, client: Client) -> None:
        self.sync = client

    @classmethod
    async def connect(
        cls,
        server: str | None = None,
        *,
        token: str | None = None,
        ca_pem: bytes | None = None,
    ) -> "AsyncClient":
        """Connects to hci-daemon (see :class:`hci.Client`)."""
        c = await asyncio.to_thread(Client, server, token=token, ca_pem=ca_pem)
        return cls(c)

    async def get(self, kind: type[R], name: str) -> R:
        """Reads one resource."""
        return await asyncio.to_thread(self.sync.get, kind, name)

    async def list(self, kind: type[R], labels: Mapping[str, str] | None = None) -> list[R]:
        """Lists resources of a kind."""
        return await asyncio.to_thread(self.sync.list, kind, labels)

    async def create(self, resource: R) -> R:
        """Creates a resource."""
        return await asyncio.to_thread(self.sync.create, resource)

    async def update(self, resource: R) -> R:
        """Updates a resource (optimistic concurrency)."""
        return await asyncio.to_thread(self.sync.update, resource)

    async def apply(self, resource: R) -> R:
        """Creates or updates a resource."""
        return await asyncio.to_thread(self.sync.apply, resource)

    async def delete(self, kind: type[Resource], name: str, *, resource_version: int = 0) -> int:
        """Deletes a resource."""
        return await asyncio.to_thread(
            self.sync.delete, kind, name, resource_version=resource_version
        )

    async def wait_for(
        self, kind: type[R], name: str, predicate: Callable[[R], bool], timeout: float = 60.0
    ) -> R:
        """Waits until a resource satisfies ``predicate``."""
        return await asyncio.to_thread(self.sync.wait_for, kind, name, predicate, timeout)

    async def wait_for_phase(self, vm: str, phase: str, timeout: float = 60.0) -> VirtualMachine:
        """Waits until a VM reaches ``phase``."""
        return await asyncio.to_thread(self.sync.wait_for_phase, vm, phase, timeout)

    async def wait_deleted(self, kind: type[Resource], name: str, timeout: float = 60.0) -> None:
        """Waits until a resource is gone."""
        await asyncio.to_thread(self.sync.wait_deleted, kind, name, timeout)

    async def start(self, vm: str) -> VirtualMachine:
        """Starts a VM."""
        return await asyncio.to_thread(self.sync.start, vm)

    async def stop(self, vm: str) -> VirtualMachine:
        """Stops a VM."""
        return await asyncio.to_thread(self.sync.stop, vm)

    async def restart(self, vm: str) -> VirtualMachine:
        """Restarts a VM."""
        return await asyncio.to_thread(self.sync.restart, vm)

    async def migrate(self, vm: str, to: str | None = None) -> VirtualMachine:
        """Asks for a VM's live migration."""
        return await asyncio.to_thread(self.sync.migrate, vm, to)

    async def cancel_migration(self, vm: str) -> VirtualMachine:
        """Asks for the cancel of a VM's live migration."""
        return await asyncio.to_thread(self.sync.cancel_migration, vm)

    async def wait_for_migration(self, vm: str, timeout: float = 600.0) -> dict[str, Any]:
        """Waits until a VM's live migration ends; its record."""
        return await asyncio.to_thread(self.sync.wait_for_migration, vm, timeout)

    async def snapshot_vm(self, vm: str, name: str) -> VirtualMachineSnapshot:
        """Takes a VirtualMachineSnapshot of a VM."""
        return await asyncio.to_thread(self.sync.snapshot_vm, vm, name)

    async def restore_vm_snapshot(self, snapshot: str, vm: str) -> VirtualMachine:
        """Restores a VirtualMachineSnapshot as a new VM."""
        return await asyncio.to_thread(self.sync.restore_vm_snapshot, snapshot, vm)


async def backup(
    repo: _hci.BackupRepository,
    store: _hci.VolumeStore,
    volume: str,
    snapshot: str,
    *,
    base: str | None = None,
    metadata: dict[str, str] | None = None,
) -> _hci.BackupInfo:
    """Awaitable :meth:`hci.BackupRepository.backup`."""
    return await asyncio.to_thread(
        repo.backup, store, volume, snapshot, base=base, metadata=metadata
    )


async def restore(
    repo: _hci.BackupRepository, backup_id: str, volume: _hci.VolumeHandle
) -> None:
    """Awaitable :meth:`hci.BackupRepository.restore`."""
    await asyncio.to_thread(repo.restore, backup_id, volume)


async def verify(repo: _hci.BackupRepository, backup_id: str) -> _hci.VerifyReport:
    """Awaitable :meth:`hci.BackupRepository.verify`."""
    return await asyncio.to_thread(repo.verify, backup_id)
