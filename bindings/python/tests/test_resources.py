"""Typed resources: construction, dict/JSON/YAML round trips of every
kind, validation by the Rust model."""

from __future__ import annotations

from typing import Any

import pytest

import hci
from hci import _hci

DOCS: dict[str, dict[str, Any]] = {
    "VirtualMachine": {
        "metadata": {"name": "web", "labels": {"tier": "frontend"}},
        "spec": {
            "cpus": 2,
            "memory": "64Mi",
            "boot": {"type": "kernel", "path": "guest:blk", "cmdline": "stay=1"},
            "disks": [{"name": "root", "volume": "web-root"}],
            "nics": [{"name": "eth0", "network": "lan"}],
            "runStrategy": "Always",
        },
    },
    "Volume": {"metadata": {"name": "web-root"}, "spec": {"size": "256Mi"}},
    "Image": {
        "metadata": {"name": "debian"},
        "spec": {"url": "https://example.com/debian.qcow2", "format": "qcow2"},
    },
    "Network": {
        "metadata": {"name": "lan"},
        "spec": {
            "kind": {"type": "management"},
            "cidr": "10.42.0.0/24",
            "gateway": "10.42.0.1",
        },
    },
    "Snapshot": {"metadata": {"name": "s1"}, "spec": {"volume": "web-root"}},
    "VirtualMachineSnapshot": {"metadata": {"name": "web-s1"}, "spec": {"vm": "web"}},
    "Backup": {
        "metadata": {"name": "b1"},
        "spec": {"source": {"kind": "volume", "name": "web-root"}, "target": "nfs"},
    },
    "BackupTarget": {"metadata": {"name": "nfs"}, "spec": {"url": "file:///srv/backups"}},
    "Schedule": {
        "metadata": {"name": "nightly"},
        "spec": {
            "cron": "0 3 * * *",
            "task": {"type": "snapshot"},
            "source": {"kind": "volume", "name": "web-root"},
            "retain": 7,
        },
    },
    "Node": {"metadata": {"name": "n1"}, "spec": {"cordoned": True}},
}


def doc(kind: str) -> dict[str, Any]:
    return {"apiVersion": hci.API_VERSION, "kind": kind, **DOCS[kind]}


def test_every_model_kind_has_a_class() -> None:
    assert sorted(hci.KINDS) == sorted(_hci.kinds()) == sorted(DOCS)


@pytest.mark.parametrize("kind", sorted(DOCS))
def test_round_trips(kind: str) -> None:
    cls = hci.KINDS[kind]
    r = cls.from_dict(doc(kind))
    assert type(r) is cls and r.kind == kind and r.name == DOCS[kind]["metadata"]["name"]
    # dict -> object -> dict is stable, and so are JSON and YAML.
    d = r.to_dict()
    assert cls.from_dict(d) == r
    assert cls.from_json(r.to_json()) == r
    y = r.to_yaml()
    assert f"kind: {kind}" in y
    assert cls.from_yaml(y) == r
    # The generic entry points pick the class from the kind.
    assert type(hci.from_dict(d)) is cls
    assert hci.load_yaml(y) == [r]
    assert repr(r).startswith(f"{kind}({r.name!r}")
    # Built from name + spec, it is the same document.
    built = cls(r.name, r.spec, labels=r.labels)
    assert built.to_dict()["spec"] == d["spec"]
    built.validate()


def test_typed_accessors() -> None:
    vm = hci.VirtualMachine.from_dict(doc("VirtualMachine"))
    assert (vm.cpus, vm.memory, vm.run_strategy, vm.phase) == (2, "64Mi", "Always", None)
    assert repr(vm) == "VirtualMachine('web', cpus=2, memory='64Mi')"
    net = hci.Network.from_dict(doc("Network"))
    assert (net.network_type, net.cidr) == ("management", "10.42.0.0/24")
    assert hci.Volume("v", {"size": "1Gi"}).size == "1Gi"
    assert hci.Snapshot.from_dict(doc("Snapshot")).volume == "web-root"
    assert hci.Node.from_dict(doc("Node")).cordoned


def test_multi_document_yaml() -> None:
    text = "\n---\n".join(hci.KINDS[k].from_dict(doc(k)).to_yaml() for k in sorted(DOCS))
    rs = hci.load_yaml(text)
    assert [r.kind for r in rs] == sorted(DOCS)


def test_validation_names_every_field() -> None:
    bad = doc("Volume")
    bad["metadata"] = {"name": "Bad_Name"}
    bad["spec"] = {"size": 0}
    with pytest.raises(hci.InvalidSpec) as e:
        hci.Volume.from_dict(bad)
    assert "metadata.name" in str(e.value) and "spec.size" in str(e.value)
    with pytest.raises(hci.InvalidSpec, match="unknown field"):
        hci.Volume.from_dict({**doc("Volume"), "spec": {"size": "1Gi", "sise": 1}})
    with pytest.raises(hci.InvalidSpec, match="expected a Volume document"):
        hci.Volume.from_dict(doc("Snapshot"))
    with pytest.raises(hci.InvalidSpec, match="line"):
        hci.load_yaml("apiVersion: hci.dev/v1\nkind: Volume\nmetadata: {name: a}\nspec: {size: 1.5Gi}\n")
    with pytest.raises(TypeError):
        hci.Resource("x")
