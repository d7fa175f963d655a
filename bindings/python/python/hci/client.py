"""The hci-daemon client: typed resources over the gRPC API.

>>> client = hci.Client("unix:///var/lib/hci/hci.sock")        # doctest: +SKIP
>>> vm = client.get(hci.VirtualMachine, "web")                   # doctest: +SKIP
>>> client.stop("web")                                           # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

from . import _hci
from .resources import (
    Resource,
    Snapshot,
    VirtualMachine,
    VirtualMachineSnapshot,
    Volume,
)

__all__ = ["Client", "WatchEvent", "Watch", "Console", "DEFAULT_SERVER"]

#: Where ``hci-daemon`` listens with its default data directory.
DEFAULT_SERVER = "unix:///var/lib/hci/hci.sock"

R = TypeVar("R", bound=Resource)


def _load(cls: type[R], doc: tuple[str, int]) -> R:
    return cls._from_normalized(json.loads(doc[0]))


@dataclass(frozen=True)
class WatchEvent(Generic[R]):
    """One change seen by a watch."""

    #: ``"PUT"`` (created or updated) or ``"DELETE"``.
    type: str
    #: The resource's new state (for ``DELETE``: kind and name only).
    resource: R
    #: Store revision of the change.
    revision: int


class Watch(Generic[R]):
    """An iterator of :class:`WatchEvent`; also a context manager that ends the watch."""

    def __init__(self, cls: type[R], stream: _hci.WatchStream) -> None:
        self._cls = cls
        self._stream = stream

    def __iter__(self) -> "Watch[R]":
        return self

    def __next__(self) -> WatchEvent[R]:
        ev = self._stream.next(None)
        if ev is None:
            raise StopIteration
        return self._event(ev)

    def next(self, timeout: float | None = None) -> WatchEvent[R] | None:
        """The next event, or None after ``timeout`` seconds or at the end."""
        ev = self._stream.next(timeout)
        return None if ev is None else self._event(ev)

    def _event(self, ev: tuple[str, str, str, int, int]) -> WatchEvent[R]:
        kind, name, doc, rv, revision = ev
        if kind == "DELETE":
            # Deletions carry the kind and name only.
            obj = self._cls.__new__(self._cls)
            Resource.__init__(obj, name)
        else:
            obj = _load(self._cls, (doc, rv))
        return WatchEvent(type=kind, resource=obj, revision=revision)

    def close(self) -> None:
        """Ends the watch."""
        self._stream.close()

    def __enter__(self) -> "Watch[R]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Console:
    """A VM's serial console: iterate for output chunks, :meth:`write` to type."""

    def __init__(self, stream: _hci.ConsoleStream) -> None:
        self._stream = stream

    def read(self, timeout: float | None = None) -> bytes | None:
        """The next output chunk; ``b""`` on timeout, None once the console closed."""
        return self._stream.read(timeout)

    def read_until(self, text: str | bytes, timeout: float = 60.0) -> bytes:
        """Reads until ``text`` appears; returns everything read.

        Raises :class:`hci.Unavailable` if the console closes first and
        :class:`TimeoutError` after ``timeout`` seconds.
        """
        want = text.encode() if isinstance(text, str) else text
        buf = b""
        deadline = time.monotonic() + timeout
        while want not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{want!r} did not appear on the console within {timeout}s")
            chunk = self._stream.read(min(left, 1.0))
            if chunk is None:
                raise _hci.Unavailable(f"the console closed before {want!r} appeared")
            buf += chunk
        return buf

    def write(self, data: str | bytes) -> None:
        """Types ``data`` into the console."""
        self._stream.write(data.encode() if isinstance(data, str) else data)

    def close(self) -> None:
        """Closes the session (the VM keeps running)."""
        self._stream.close()

    def __iter__(self) -> Iterator[bytes]:
        while True:
            chunk = self._stream.read(None)
            if chunk is None:
                return
            yield chunk

    def __enter__(self) -> "Console":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """A connection to hci-daemon.

    ``server`` is ``unix:///path/hci.sock`` (or ``unix:/path``) or
    ``https://host:port``; https needs a bearer ``token`` (or
    ``token_file``) and, for a private CA, ``ca_pem``. Defaults to
    ``$HCI_SERVER`` or :data:`DEFAULT_SERVER`.

    Every resource kind is covered by the generic calls (:meth:`get`,
    :meth:`list`, :meth:`create`, :meth:`update`, :meth:`apply`,
    :meth:`delete`, :meth:`watch`), which take the resource class.
    """

    def __init__(
        self,
        server: str | None = None,
        *,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        ca_pem: bytes | None = None,
    ) -> None:
        server = server or os.environ.get("HCI_SERVER") or DEFAULT_SERVER
        if token is None and token_file is not None:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        self._raw = _hci.RawClient(server, token=token, ca_pem=ca_pem)

    @property
    def server(self) -> str:
        """The daemon's address."""
        return self._raw.server

    @property
    def raw(self) -> _hci.RawClient:
        """The low-level client (JSON documents)."""
        return self._raw

    # -- generic CRUD -------------------------------------------------------

    def get(self, kind: type[R], name: str) -> R:
        """Reads resource ``name`` of ``kind``; raises :class:`hci.NotFound`."""
        return _load(kind, self._raw.get(kind.kind, name))

    def list(self, kind: type[R], labels: Mapping[str, str] | None = None) -> list[R]:
        """Lists resources of ``kind`` (with all of ``labels``), sorted by name."""
        items, _ = self._raw.list(kind.kind, dict(labels) if labels else None)
        return [_load(kind, d) for d in items]

    def create(self, resource: R) -> R:
        """Creates ``resource``; returns it as stored (uid, version, status)."""
        return _load(type(resource), self._raw.create(resource.kind, resource.to_json()))

    def update(self, resource: R) -> R:
        """Replaces metadata and spec if the stored version is still
        ``resource.resource_version``; raises :class:`hci.Conflict` otherwise."""
        doc = self._raw.update(resource.kind, resource.to_json(), resource.resource_version)
        return _load(type(resource), doc)

    def apply(self, resource: R) -> R:
        """Creates ``resource``, or updates the stored one's metadata and spec."""
        try:
            return self.create(resource)
        except _hci.AlreadyExists:

            def take(current: R) -> None:
                current.metadata.labels = dict(resource.metadata.labels)
                current.metadata.annotations = dict(resource.metadata.annotations)
                current.spec = copy.deepcopy(resource.spec)

            return self.modify(type(resource), resource.name, take)

    def modify(
        self, kind: type[R], name: str, mutate: Callable[[R], None], *, attempts: int = 10
    ) -> R:
        """Read-modify-write: reads resource ``name``, calls ``mutate`` on it
        and updates it, retrying from a fresh read when someone else (a
        controller updating status, another client) changed it meanwhile."""
        for attempt in range(attempts):
            obj = self.get(kind, name)
            mutate(obj)
            try:
                return self.update(obj)
            except _hci.Conflict:
                if attempt + 1 == attempts:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def delete(self, kind: type[Resource], name: str, *, resource_version: int = 0) -> int:
        """Deletes resource ``name`` (only at ``resource_version`` unless 0);
        returns the store revision of the deletion."""
        return self._raw.delete(kind.kind, name, resource_version)

    def watch(
        self, kind: type[R], name: str | None = None, *, from_revision: int = 0
    ) -> Watch[R]:
        """Follows changes to resources of ``kind`` (or just ``name``), from
        store revision ``from_revision`` (0: from now on)."""
        return Watch(kind, self._raw.watch(kind.kind, name, from_revision))

    def wait_for(
        self,
        kind: type[R],
        name: str,
        predicate: Callable[[R], bool],
        timeout: float = 60.0,
    ) -> R:
        """Waits until resource ``name`` satisfies ``predicate``; returns it.

        Lists-then-watches, so no change is missed. Raises
        :class:`TimeoutError` after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        items, revision = self._raw.list(kind.kind, None)
        last: R | None = None
        for doc in items:
            obj = _load(kind, doc)
            if obj.name == name:
                last = obj
                if predicate(obj):
                    return obj
        with self.watch(kind, name, from_revision=revision + 1) as w:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{kind.kind} {name!r} did not reach the awaited state within "
                        f"{timeout}s; last seen: {last!r}"
                    )
                ev = w.next(timeout=left)
                if ev is None or ev.type != "PUT":
                    continue
                last = ev.resource
                if predicate(ev.resource):
                    return ev.resource

    def wait_deleted(self, kind: type[Resource], name: str, timeout: float = 60.0) -> None:
        """Waits until resource ``name`` is gone (deletions with cleanup
        finish asynchronously). Raises :class:`TimeoutError`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._raw.get(kind.kind, name)
            except _hci.NotFound:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{kind.kind} {name!r} still exists after {timeout}s")
            time.sleep(0.1)

    # -- VMs ----------------------------------------------------------------

    def start(self, vm: str, *, resource_version: int = 0) -> VirtualMachine:
        """Starts VM ``vm``; returns the updated VM (the controller carries it out)."""
        return _load(VirtualMachine, self._raw.vm_action("start", vm, resource_version))

    def stop(self, vm: str, *, resource_version: int = 0) -> VirtualMachine:
        """Stops VM ``vm``."""
        return _load(VirtualMachine, self._raw.vm_action("stop", vm, resource_version))

    def restart(self, vm: str, *, resource_version: int = 0) -> VirtualMachine:
        """Restarts VM ``vm``."""
        return _load(VirtualMachine, self._raw.vm_action("restart", vm, resource_version))

    def pause(self, vm: str, *, resource_version: int = 0) -> VirtualMachine:
        """Pauses running VM ``vm``."""
        return _load(VirtualMachine, self._raw.vm_action("pause", vm, resource_version))

    def resume(self, vm: str, *, resource_version: int = 0) -> VirtualMachine:
        """Resumes paused VM ``vm``."""
        return _load(VirtualMachine, self._raw.vm_action("resume", vm, resource_version))

    def migrate(self, vm: str, to: str | None = None) -> VirtualMachine:
        """Asks for a live migration of running VM ``vm`` to node ``to`` (or
        the best node by the placement rules). Cluster mode only. Returns at
        once; follow it with :meth:`wait_for_migration`."""
        return _load(VirtualMachine, self._raw.migrate_vm(vm, to or ""))

    def cancel_migration(self, vm: str) -> VirtualMachine:
        """Asks the source node to cancel VM ``vm``'s live migration. It
        takes effect only before the switch-over; :meth:`wait_for_migration`
        then says where the VM ended (a cancelled migration raises)."""
        return _load(VirtualMachine, self._raw.migrate_vm(vm, "", True))

    def wait_for_migration(self, vm: str, timeout: float = 600.0) -> dict[str, Any]:
        """Waits until VM ``vm``'s current live migration ends; returns its
        record (``status.migration``: source and target node, passes, bytes
        sent, downtime). Raises :class:`hci.Unavailable` with the reason if it
        failed or was cancelled, :class:`TimeoutError` if still going."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.get(VirtualMachine, vm).status or {}
            m = status.get("migration")
            if m is not None and m.get("phase") == "Succeeded":
                return dict(m)
            if m is not None and m.get("phase") == "Failed":
                raise _hci.Unavailable(f"live migration of VM {vm!r}: {m.get('message', '')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the live migration of VM {vm!r} still runs after {timeout}s")
            time.sleep(0.2)

    def console(self, vm: str) -> Console:
        """Attaches to the serial console of running VM ``vm``."""
        return Console(self._raw.console(vm))

    def wait_for_phase(self, vm: str, phase: str, timeout: float = 60.0) -> VirtualMachine:
        """Waits until VM ``vm`` reaches ``phase`` (e.g. ``"Running"``)."""
        return self.wait_for(VirtualMachine, vm, lambda v: v.phase == phase, timeout)

    # -- volumes and backups ------------------------------------------------

    def snapshot_volume(
        self, volume: str, snapshot: str, labels: Mapping[str, str] | None = None
    ) -> Snapshot:
        """Creates Snapshot resource ``snapshot`` of volume ``volume``."""
        doc = self._raw.snapshot_volume(volume, snapshot, dict(labels) if labels else None)
        return _load(Snapshot, doc)

    def clone_volume(self, volume: str, name: str) -> Volume:
        """Creates volume ``name`` with the content of volume ``volume``."""
        return _load(Volume, self._raw.clone_volume(volume, name))

    def expand_volume(self, volume: str, size: int, *, resource_version: int = 0) -> Volume:
        """Grows volume ``volume`` to ``size`` bytes."""
        return _load(Volume, self._raw.expand_volume(volume, size, resource_version))

    def restore_backup(self, backup: str, volume: str, size: int = 0) -> Volume:
        """Restores backup ``backup`` into new volume ``volume``."""
        return _load(Volume, self._raw.restore_backup(backup, volume, size))

    def restore_vm(self, backup: str, vm: str) -> VirtualMachine:
        """Restores the whole-VM backup ``backup`` as new VM ``vm``: its
        volumes are created as ``<vm>-<volume>`` and filled from the backup
        in the background (follow them with :meth:`wait_for`)."""
        return _load(VirtualMachine, self._raw.restore_backup(backup, "", 0, vm))

    def snapshot_vm(self, vm: str, name: str) -> VirtualMachineSnapshot:
        """Takes VirtualMachineSnapshot ``name`` of VM ``vm``: every volume at
        one instant (the VM is paused meanwhile), with its spec. Returns at
        once; wait for ``phase == "Ready"`` with :meth:`wait_for`."""
        return self.create(VirtualMachineSnapshot(name, {"vm": vm}))

    def restore_vm_snapshot(self, snapshot: str, vm: str) -> VirtualMachine:
        """Restores VirtualMachineSnapshot ``snapshot`` as new VM ``vm``: its
        volumes are cloned from the snapshot's as ``<vm>-<volume>`` (follow
        them with :meth:`wait_for`)."""
        return _load(VirtualMachine, self._raw.restore_vm_snapshot(snapshot, vm))

    def __repr__(self) -> str:
        return f"Client({self.server!r})"

