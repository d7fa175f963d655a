"""Typed resource objects: VirtualMachine, Volume, Network, ….

Every resource is a document ``{apiVersion, kind, metadata, spec, status}``,
the same one ``hcictl apply`` reads. Documents are parsed and validated by
hci-core's Rust model (:func:`hci._hci.validate_json`), so a Python object
obeys exactly the rules the daemon applies and :class:`hci.InvalidSpec`
names every offending field.

>>> vol = Volume("data", {"size": "1Gi"})
>>> vol.to_dict()["spec"]["size"]
'1Gi'
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, TypeVar

from . import _hci

__all__ = [
    "API_VERSION",
    "ObjectMeta",
    "Resource",
    "VirtualMachine",
    "Volume",
    "Image",
    "Network",
    "Snapshot",
    "Backup",
    "BackupTarget",
    "Schedule",
    "Node",
    "KINDS",
    "from_dict",
    "load_yaml",
]

#: The API version every document carries.
API_VERSION = "hci.dev/v1"

R = TypeVar("R", bound="Resource")


@dataclass
class ObjectMeta:
    """A resource's metadata: name, labels, annotations and what the server sets."""

    #: The resource's name (a DNS-1123 label).
    name: str
    #: Labels, for selection.
    labels: dict[str, str] = field(default_factory=dict)
    #: Free-form annotations.
    annotations: dict[str, str] = field(default_factory=dict)
    #: Unique id, assigned by the server.
    uid: str | None = None
    #: Store revision of the last change (for optimistic concurrency), set by the server.
    resource_version: int = 0
    #: Bumped by the server on every spec change.
    generation: int = 0
    #: Creation time (RFC 3339), set by the server.
    created_at: str | None = None
    #: Last update time (RFC 3339), set by the server.
    updated_at: str | None = None

    _FIELDS: ClassVar[dict[str, str]] = {
        "name": "name",
        "labels": "labels",
        "annotations": "annotations",
        "uid": "uid",
        "resourceVersion": "resource_version",
        "generation": "generation",
        "createdAt": "created_at",
        "updatedAt": "updated_at",
    }

    def to_dict(self) -> dict[str, Any]:
        """The camelCase document form, without unset fields."""
        out: dict[str, Any] = {"name": self.name}
        for key, attr in self._FIELDS.items():
            value = getattr(self, attr)
            if key != "name" and value not in (None, 0, {}, ""):
                out[key] = copy.deepcopy(value)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ObjectMeta":
        """Builds metadata from its camelCase document form."""
        kwargs = {attr: copy.deepcopy(d[key]) for key, attr in cls._FIELDS.items() if key in d}
        kwargs.setdefault("name", "")
        return cls(**kwargs)


class Resource:
    """Base class of every resource kind.

    Build one from a name and a spec mapping (camelCase keys, as in YAML),
    from a document with :meth:`from_dict`, or from YAML with
    :meth:`from_yaml`. ``status`` is set by the server and read-only in
    practice.
    """

    #: The resource kind, e.g. ``"Volume"``.
    kind: ClassVar[str] = ""

    #: Metadata (name, labels, annotations, resource version…).
    metadata: ObjectMeta
    #: Desired state, as a camelCase mapping.
    spec: dict[str, Any]
    #: Observed state set by the server, or None.
    status: dict[str, Any] | None

    def __init__(
        self,
        name: str,
        spec: Mapping[str, Any] | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        status: Mapping[str, Any] | None = None,
    ) -> None:
        if not self.kind:
            raise TypeError("instantiate a resource kind such as hci.Volume, not hci.Resource")
        self.metadata = ObjectMeta(
            name=name, labels=dict(labels or {}), annotations=dict(annotations or {})
        )
        self.spec = copy.deepcopy(dict(spec or {}))
        self.status = copy.deepcopy(dict(status)) if status is not None else None

    # -- identity -----------------------------------------------------------

    @property
    def name(self) -> str:
        """The resource's name."""
        return self.metadata.name

    @property
    def resource_version(self) -> int:
        """Store revision of the resource's last change (0 before creation)."""
        return self.metadata.resource_version

    @property
    def labels(self) -> dict[str, str]:
        """The resource's labels (mutable)."""
        return self.metadata.labels

    # -- conversions --------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The full document as plain dicts and lists (camelCase keys)."""
        d: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "metadata": self.metadata.to_dict(),
            "spec": copy.deepcopy(self.spec),
        }
        if self.status is not None:
            d["status"] = copy.deepcopy(self.status)
        return d

    def to_json(self) -> str:
        """The document as JSON."""
        return json.dumps(self.to_dict())

    def to_yaml(self) -> str:
        """The document as YAML (what ``hcictl apply -f`` reads)."""
        return _hci.to_yaml(self.to_json())

    def validate(self) -> None:
        """Checks the document against the model; raises :class:`hci.InvalidSpec`."""
        _hci.validate_json(self.to_json())

    @classmethod
    def from_dict(cls: type[R], d: Mapping[str, Any]) -> R:
        """Builds a resource from a document, validating it.

        On :class:`Resource` itself the document's ``kind`` picks the class;
        on a kind class the document must be of that kind.
        """
        normalized = json.loads(_hci.validate_json(json.dumps(d)))
        return cls._from_normalized(normalized)

    @classmethod
    def from_json(cls: type[R], text: str) -> R:
        """Builds a resource from a JSON document, validating it."""
        return cls._from_normalized(json.loads(_hci.validate_json(text)))

    @classmethod
    def from_yaml(cls: type[R], text: str) -> R:
        """Builds a resource from a YAML text holding exactly one document."""
        docs = _hci.parse_yaml(text)
        if len(docs) != 1:
            raise _hci.InvalidSpec(f"expected one YAML document, found {len(docs)}")
        return cls._from_normalized(json.loads(docs[0]))

    @classmethod
    def _from_normalized(cls: type[R], d: Mapping[str, Any]) -> R:
        """Builds from an already validated document (trusted: from the daemon)."""
        kind = str(d.get("kind", ""))
        target = KINDS.get(kind)
        if target is None:
            raise _hci.InvalidSpec(f"unknown resource kind {kind!r}")
        if cls is not Resource and target is not cls:
            raise _hci.InvalidSpec(f"expected a {cls.kind} document, got a {kind}")
        obj = target.__new__(target)
        obj.metadata = ObjectMeta.from_dict(d.get("metadata") or {})
        obj.spec = copy.deepcopy(dict(d.get("spec") or {}))
        status = d.get("status")
        obj.status = copy.deepcopy(dict(status)) if status is not None else None
        assert isinstance(obj, cls)
        return obj

    # -- Python protocol ----------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Resource):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        parts = [repr(self.name)]
        parts += [f"{k}={v!r}" for k, v in self._summary().items()]
        if self.metadata.resource_version:
            parts.append(f"resource_version={self.metadata.resource_version}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def _summary(self) -> dict[str, Any]:
        """The few fields shown by ``repr``."""
        return {}

    def _status(self, key: str, default: Any = None) -> Any:
        return (self.status or {}).get(key, default)


class VirtualMachine(Resource):
    """A virtual machine: CPUs, memory, boot, disks on volumes, NICs on networks."""

    kind = "VirtualMachine"

    @property
    def cpus(self) -> int:
        """Number of vCPUs."""
        return int(self.spec.get("cpus", 1))

    @property
    def memory(self) -> str:
        """Guest memory, e.g. ``"2Gi"``."""
        return str(self.spec.get("memory", ""))

    @property
    def run_strategy(self) -> str:
        """``Always``, ``RerunOnFailure``, ``Manual`` or ``Halted``."""
        return str(self.spec.get("runStrategy", "Always"))

    @property
    def phase(self) -> str | None:
        """Lifecycle phase (``Pending``, ``Starting``, ``Running``, ``Stopped``…), or None."""
        p = self._status("phase")
        return None if p is None else str(p)

    @property
    def node(self) -> str | None:
        """The node running the VM, or None."""
        n = self._status("node")
        return None if n is None else str(n)

    @property
    def ip_addresses(self) -> list[str]:
        """Guest IP addresses learned by DHCP."""
        return [str(a) for a in self._status("ipAddresses", [])]

    @property
    def message(self) -> str:
        """Human-readable status detail (why it is pending or failed)."""
        return str(self._status("message", ""))

    def _summary(self) -> dict[str, Any]:
        s: dict[str, Any] = {"cpus": self.cpus, "memory": self.memory}
        if self.phase is not None:
            s["phase"] = self.phase
        return s


class Volume(Resource):
    """A block volume: size, replicas, source, encryption."""

    kind = "Volume"

    @property
    def size(self) -> str | int:
        """Requested size, e.g. ``"20Gi"`` (as written in the spec)."""
        s = self.spec.get("size", 0)
        return s if isinstance(s, (int, str)) else str(s)

    @property
    def replicas(self) -> int:
        """Replica count."""
        return int(self.spec.get("replicas", 1))

    @property
    def phase(self) -> str | None:
        """Lifecycle phase (``Pending``, ``Ready``…), or None."""
        p = self._status("phase")
        return None if p is None else str(p)

    def _summary(self) -> dict[str, Any]:
        s: dict[str, Any] = {"size": self.size}
        if self.phase is not None:
            s["phase"] = self.phase
        return s


class Image(Resource):
    """A disk image (raw, qcow2, ISO) that volumes are created from."""

    kind = "Image"

    @property
    def url(self) -> str:
        """Where the image is downloaded from."""
        return str(self.spec.get("url", ""))

    @property
    def phase(self) -> str | None:
        """Import phase, or None."""
        p = self._status("phase")
        return None if p is None else str(p)

    def _summary(self) -> dict[str, Any]:
        return {"url": self.url}


class Network(Resource):
    """A network: management (NAT), bridge, VLAN or overlay, with DHCP."""

    kind = "Network"

    @property
    def network_type(self) -> str:
        """``management``, ``bridge``, ``vlan`` or ``overlay``."""
        k = self.spec.get("kind") or {}
        return str(k.get("type", "")) if isinstance(k, dict) else str(k)

    @property
    def cidr(self) -> str:
        """The subnet, e.g. ``"10.42.0.0/24"``."""
        return str(self.spec.get("cidr", ""))

    @property
    def ready_nodes(self) -> list[str]:
        """Nodes where the network is set up."""
        return [str(n) for n in self._status("readyNodes", [])]

    def _summary(self) -> dict[str, Any]:
        return {"type": self.network_type, "cidr": self.cidr}


class Snapshot(Resource):
    """A snapshot of a volume."""

    kind = "Snapshot"

    @property
    def volume(self) -> str:
        """The snapshotted volume."""
        return str(self.spec.get("volume", ""))

    @property
    def phase(self) -> str | None:
        """Lifecycle phase (``Pending``, ``Ready``…), or None."""
        p = self._status("phase")
        return None if p is None else str(p)

    def _summary(self) -> dict[str, Any]:
        s: dict[str, Any] = {"volume": self.volume}
        if self.phase is not None:
            s["phase"] = self.phase
        return s


class VirtualMachineSnapshot(Resource):
    """Every volume of a VM at one instant, with the VM's spec."""

    kind = "VirtualMachineSnapshot"

    @property
    def vm(self) -> str:
        """The snapshotted VM."""
        return str(self.spec.get("vm", ""))

    @property
    def phase(self) -> str | None:
        """Lifecycle phase (``Pending``, ``Ready``, ``Failed``), or None."""
        p = self._status("phase")
        return None if p is None else str(p)

    @property
    def volume_snapshots(self) -> dict[str, str]:
        """The ``Snapshot`` of each of the VM's volumes, by volume."""
        vols = self._status("volumes") or []
        return {str(v["volume"]): str(v["snapshot"]) for v in vols}

    def _summary(self) -> dict[str, Any]:
        s: dict[str, Any] = {"vm": self.vm}
        if self.phase is not None:
            s["phase"] = self.phase
        return s


class Backup(Resource):
    """A backup of a volume (or VM) on a backup target."""

    kind = "Backup"

    @property
    def phase(self) -> str | None:
        """Lifecycle phase, or None."""
        p = self._status("phase")
        return None if p is None else str(p)


class BackupTarget(Resource):
    """Where backups go: ``s3://…`` or ``file://…``."""

    kind = "BackupTarget"

    @property
    def url(self) -> str:
        """The target URL."""
        return str(self.spec.get("url", ""))

    def _summary(self) -> dict[str, Any]:
        return {"url": self.url}


class Schedule(Resource):
    """A cron schedule of snapshots or backups with retention."""

    kind = "Schedule"

    @property
    def cron(self) -> str:
        """The 5-field cron expression."""
        return str(self.spec.get("cron", ""))

    def _summary(self) -> dict[str, Any]:
        return {"cron": self.cron}


class Node(Resource):
    """A node of the cluster: cordon/maintenance flags, capacity in status."""

    kind = "Node"

    @property
    def cordoned(self) -> bool:
        """True if no new VMs are scheduled here."""
        return bool(self.spec.get("cordoned", False))


#: Every resource class by kind name.
KINDS: dict[str, type[Resource]] = {
    c.kind: c
    for c in (
        VirtualMachine,
        Volume,
        Image,
        Network,
        Snapshot,
        VirtualMachineSnapshot,
        Backup,
        BackupTarget,
        Schedule,
        Node,
    )
}


def from_dict(d: Mapping[str, Any]) -> Resource:
    """Builds the resource of the document's kind, validating it."""
    return Resource.from_dict(d)


def load_yaml(text: str) -> list[Resource]:
    """Parses a YAML stream of one or more ``---``-separated documents."""
    return [Resource._from_normalized(json.loads(doc)) for doc in _hci.parse_yaml(text)]
