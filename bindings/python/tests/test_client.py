"""The daemon client against a real hci-daemon: CRUD of every kind,
optimistic concurrency, watch, volume actions, VM power actions and the
serial console, error mapping over gRPC."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import hci

from conftest import Daemon, kvm_usable


def test_crud_round_trip_of_every_kind(client: hci.Client, tmp_path: Path) -> None:
    target_dir = tmp_path / "backups"
    target_dir.mkdir()
    image = tmp_path / "tiny.raw"
    image.write_bytes(b"\xeb" * 65536)
    resources: list[hci.Resource] = [
        hci.Volume("crud-vol", {"size": "16Mi"}, labels={"suite": "crud"}),
        hci.Snapshot("crud-snap", {"volume": "crud-vol"}),
        hci.Image("crud-img", {"url": image.as_uri(), "format": "raw"}),
        hci.Network(
            "crud-net",
            {"kind": {"type": "management"}, "cidr": "10.98.0.0/24", "gateway": "10.98.0.1"},
        ),
        hci.BackupTarget("crud-target", {"url": target_dir.as_uri()}),
        hci.Backup(
            "crud-backup",
            {"source": {"kind": "volume", "name": "crud-vol"}, "target": "crud-target"},
        ),
        hci.Schedule(
            "crud-sched",
            {
                "cron": "0 3 * * *",
                "task": {"type": "snapshot"},
                "source": {"kind": "volume", "name": "crud-vol"},
                "retain": 3,
                "suspend": True,
            },
        ),
        hci.VirtualMachine(
            "crud-vm",
            {
                "cpus": 1,
                "memory": "64Mi",
                "boot": {"type": "kernel", "path": "guest:hello"},
                "runStrategy": "Halted",
            },
        ),
    ]
    created: list[hci.Resource] = []
    for r in resources:
        c = client.create(r)
        created.append(c)
        assert type(c) is type(r) and c.name == r.name
        assert c.resource_version > 0 and c.metadata.uid
        assert c.spec == hci.KINDS[r.kind].from_dict(r.to_dict()).spec
        got = client.get(type(r), r.name)
        assert got.name == r.name and got.spec == c.spec
        assert r.name in [x.name for x in client.list(type(r))]

    # Label selectors.
    assert [v.name for v in client.list(hci.Volume, {"suite": "crud"})] == ["crud-vol"]
    assert client.list(hci.Volume, {"suite": "other"}) == []

    # Update with the current version works; a stale one is a Conflict.
    # (Controllers update status meanwhile: read-modify-write retries.)
    for c in created:
        before = client.get(type(c), c.name)
        updated = client.modify(type(c), c.name, lambda r: r.labels.update(updated="yes"))
        assert updated.labels["updated"] == "yes"
        assert updated.resource_version > before.resource_version
        before.labels["again"] = "no"
        with pytest.raises(hci.Conflict, match="modified concurrently"):
            client.update(before)

    # The node registered itself.
    nodes = client.list(hci.Node)
    assert [n.name for n in nodes] == ["pytest"]

    # apply = create or update.
    vm = client.get(hci.VirtualMachine, "crud-vm")
    vm.spec["cpus"] = 2
    assert client.apply(vm).cpus == 2

    for c in reversed(created):
        client.delete(type(c), c.name)
    for c in created:
        client.wait_deleted(type(c), c.name, timeout=30)
        with pytest.raises(hci.NotFound):
            client.get(type(c), c.name)


def test_errors_over_grpc(client: hci.Client, daemon: Daemon) -> None:
    with pytest.raises(hci.NotFound, match="ghost"):
        client.get(hci.VirtualMachine, "ghost")
    client.create(hci.Volume("dup", {"size": "4Mi"}))
    with pytest.raises(hci.AlreadyExists):
        client.create(hci.Volume("dup", {"size": "4Mi"}))
    # The server validates too (bypassing the client-side model check).
    bad: dict[str, Any] = {
        "apiVersion": "hci.dev/v1",
        "kind": "Volume",
        "metadata": {"name": "Bad_Name"},
        "spec": {"size": 0},
    }
    import json

    with pytest.raises(hci.InvalidSpec, match="metadata.name"):
        client.raw.create("Volume", json.dumps(bad))
    with pytest.raises(hci.InvalidSpec, match="references|does not exist|ghost"):
        client.create(hci.Snapshot("orphan", {"volume": "ghost"}))
    with pytest.raises(hci.InvalidSpec, match="unknown VM action"):
        client.raw.vm_action("explode", "x")
    client.delete(hci.Volume, "dup")
    with pytest.raises(hci.Unavailable, match="is hci-daemon running"):
        hci.Client(f"unix://{daemon.socket}.missing")
    with pytest.raises(hci.InvalidSpec, match="not a server address"):
        hci.Client("tcp://example:1")


def test_watch_sees_puts_and_deletes(client: hci.Client) -> None:
    with client.watch(hci.Volume) as w:
        client.create(hci.Volume("watched", {"size": "4Mi"}))
        ev = w.next(timeout=10)
        assert ev is not None and ev.type == "PUT" and ev.resource.name == "watched"
        assert isinstance(ev.resource, hci.Volume) and ev.revision > 0
        client.delete(hci.Volume, "watched")
        seen = []
        while True:
            e = w.next(timeout=10)
            assert e is not None, f"no DELETE event; saw {seen}"
            seen.append(e.type)
            if e.type == "DELETE":
                assert e.resource.name == "watched"
                break
    assert w.next(timeout=0.1) is None


def test_volume_actions(client: hci.Client) -> None:
    client.create(hci.Volume("act", {"size": "8Mi"}))
    client.wait_for(hci.Volume, "act", lambda v: v.phase == "Detached", timeout=30)
    snap = client.snapshot_volume("act", "act-s1", labels={"by": "pytest"})
    assert isinstance(snap, hci.Snapshot) and snap.volume == "act"
    assert snap.labels == {"by": "pytest"}
    grown = client.expand_volume("act", 16 << 20)
    assert isinstance(grown, hci.Volume)
    clone = client.clone_volume("act", "act-copy")
    assert clone.name == "act-copy"
    for kind, name in [(hci.Snapshot, "act-s1"), (hci.Volume, "act-copy")]:
        client.delete(kind, name)


def test_whole_vm_backup_restores_as_a_new_vm(client: hci.Client, tmp_path: Path) -> None:
    client.create(hci.BackupTarget("vmb-target", {"url": (tmp_path / "t").as_uri()}))
    client.create(hci.Volume("vmb-disk", {"size": "8Mi"}))
    client.create(
        hci.VirtualMachine(
            "vmb",
            {
                "cpus": 1,
                "memory": "64Mi",
                "boot": {"type": "kernel", "path": "guest:blk"},
                "disks": [{"name": "data", "volume": "vmb-disk"}],
                "runStrategy": "Halted",
            },
        )
    )
    client.wait_for(hci.Volume, "vmb-disk", lambda v: v.phase == "Detached", timeout=30)
    client.create(
        hci.Backup(
            "vmb-b1",
            {"source": {"kind": "virtualMachine", "name": "vmb"}, "target": "vmb-target"},
        )
    )
    client.wait_for(hci.Backup, "vmb-b1", lambda b: b.phase == "Completed", timeout=60)
    vm = client.restore_vm("vmb-b1", "vmb2")
    assert isinstance(vm, hci.VirtualMachine) and vm.name == "vmb2"
    restored = [d["volume"] for d in vm.spec["disks"]]
    assert restored == ["vmb2-vmb-disk"], vm.spec
    client.wait_for(hci.Volume, restored[0], lambda v: v.phase == "Detached", timeout=60)
    with pytest.raises(hci.InvalidSpec):
        client.restore_backup("vmb-b1", "plain")  # a VM backup needs a VM name
    for kind, name in [
        (hci.VirtualMachine, "vmb2"),
        (hci.Volume, "vmb2-vmb-disk"),
        (hci.Backup, "vmb-b1"),
        (hci.VirtualMachine, "vmb"),
        (hci.Volume, "vmb-disk"),
    ]:
        client.delete(kind, name)


def test_vm_snapshot_restores_as_a_new_vm(client: hci.Client) -> None:
    client.create(hci.Volume("vms-disk", {"size": "8Mi"}))
    client.create(
        hci.VirtualMachine(
            "vms",
            {
                "cpus": 1,
                "memory": "64Mi",
                "boot": {"type": "kernel", "path": "guest:blk"},
                "disks": [{"name": "data", "volume": "vms-disk"}],
                "runStrategy": "Halted",
            },
        )
    )
    client.wait_for(hci.Volume, "vms-disk", lambda v: v.phase == "Detached", timeout=30)
    snap = client.snapshot_vm("vms", "vms-s1")
    assert isinstance(snap, hci.VirtualMachineSnapshot) and snap.vm == "vms"
    snap = client.wait_for(
        hci.VirtualMachineSnapshot, "vms-s1", lambda s: s.phase == "Ready", timeout=30
    )
    assert snap.volume_snapshots == {"vms-disk": "vms-s1-vms-disk"}
    assert client.get(hci.Snapshot, "vms-s1-vms-disk").volume == "vms-disk"
    vm = client.restore_vm_snapshot("vms-s1", "vms2")
    assert [d["volume"] for d in vm.spec["disks"]] == ["vms2-vms-disk"], vm.spec
    client.wait_for(hci.Volume, "vms2-vms-disk", lambda v: v.phase == "Detached", timeout=60)
    with pytest.raises(hci.NotFound):
        client.restore_vm_snapshot("no-such-snapshot", "vms3")
    for kind, name in [
        (hci.VirtualMachine, "vms2"),
        (hci.Volume, "vms2-vms-disk"),
        (hci.VirtualMachineSnapshot, "vms-s1"),
        (hci.VirtualMachine, "vms"),
        (hci.Volume, "vms-disk"),
    ]:
        client.delete(kind, name)


@pytest.mark.skipif(not kvm_usable(), reason="needs a usable /dev/kvm")
def test_vm_power_actions_and_console(client: hci.Client) -> None:
    client.create(hci.Volume("pw-disk", {"size": "16Mi"}))
    client.create(
        hci.VirtualMachine(
            "pw",
            {
                "cpus": 1,
                "memory": "64Mi",
                "boot": {"type": "kernel", "path": "guest:blk", "cmdline": "stay=1"},
                "disks": [{"name": "data", "volume": "pw-disk"}],
                "runStrategy": "Always",
            },
        )
    )
    vm = client.wait_for_phase("pw", "Running", timeout=120)
    assert vm.node == "pytest"
    with client.console("pw") as con:
        out = con.read_until("virtio-blk OK", timeout=60)
        assert b"virtio-blk OK" in out
    # Live migration needs cluster mode: this single-node daemon records why
    # it cannot move the VM, which keeps running; no migration to cancel.
    client.migrate("pw")
    with pytest.raises(hci.Unavailable, match="cluster mode"):
        client.wait_for_migration("pw", timeout=60)
    assert client.get(hci.VirtualMachine, "pw").phase == "Running"
    with pytest.raises(hci.HciError, match="no live migration is under way"):
        client.cancel_migration("pw")
    assert client.pause("pw").name == "pw"
    client.wait_for_phase("pw", "Paused", timeout=60)
    client.resume("pw")
    client.wait_for_phase("pw", "Running", timeout=60)
    stopped = client.stop("pw")
    assert stopped.run_strategy == "Halted"
    client.wait_for_phase("pw", "Stopped", timeout=60)
    client.start("pw")
    client.wait_for_phase("pw", "Running", timeout=120)
    client.stop("pw")
    client.wait_for_phase("pw", "Stopped", timeout=60)
    client.delete(hci.VirtualMachine, "pw")
