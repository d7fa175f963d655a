"""Replicated volumes in-process: three replica servers in this process
(real TCP, the replica protocol), a store over them, and a replica lost
while the volume is written."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import hci

MiB = 1 << 20
TOKEN = b"python-test-token"


def pattern(seed: int, n: int) -> bytes:
    return bytes((seed + i * 13) % 251 for i in range(n))


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[hci.ReplicaServer]]:
    started = [hci.ReplicaServer(tmp_path / f"disk{i}", TOKEN) for i in range(3)]
    yield started
    for s in started:
        s.close()


def test_replicated_volume_round_trip(servers: list[hci.ReplicaServer]) -> None:
    store = hci.VolumeStore.replicated([s.address for s in servers], TOKEN)
    assert store.is_replicated and "replicated" in repr(store)
    with pytest.raises(hci.Unsupported):
        _ = store.root
    info = store.create("data", 8 * MiB)
    assert info.size == 8 * MiB
    data = pattern(3, 256 * 1024)
    with store.open("data") as vol:
        vol.write(4096, data)
        vol.flush()
        assert vol.read(4096, len(data)) == data
        status = vol.replica_status()
        assert status is not None
        robustness, replicas = status
        assert robustness == "healthy" and len(replicas) == 3, status
        vol.snapshot("s1")
        vol.write(4096, bytes(4096))
    assert [s.name for s in store.snapshots("data")] == ["s1"]
    with store.open_snapshot("data", "s1") as snap:
        assert snap.read(4096, len(data)) == data
    # Every replica holds the data: each alone serves it.
    for s in servers:
        one = hci.VolumeStore.replicated([s.address], TOKEN)
        with one.open("data", read_only=True) as vol:
            assert vol.read(8192, 4096) == data[4096:8192]
    store.delete("data")
    with pytest.raises(hci.NotFound):
        store.info("data")


SERVE = """
import sys, hci
s = hci.ReplicaServer(sys.argv[1], sys.argv[2].encode())
print(s.address, flush=True)
sys.stdin.read()
"""


def test_a_lost_replica_loses_no_acknowledged_write(
    servers: list[hci.ReplicaServer], tmp_path: Path
) -> None:
    # The third replica in a process of its own, to kill.
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(tmp_path / "far"), TOKEN.decode()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        far = proc.stdout.readline().strip()
        addresses = [servers[0].address, servers[1].address, far]
        _lose_one(addresses, proc)
    finally:
        proc.kill()
        proc.wait()


def _lose_one(addresses: list[str], proc: subprocess.Popen[str]) -> None:
    store = hci.VolumeStore.replicated(addresses, TOKEN, timeout=1.0)
    store.create("data", 4 * MiB)
    with store.open("data") as vol:
        vol.write(0, pattern(1, 64 * 1024))
        proc.kill()
        proc.wait()
        # The next writes still succeed on the two replicas left.
        later = pattern(2, 64 * 1024)
        vol.write(MiB, later)
        vol.flush()
        assert vol.read(MiB, len(later)) == later
        status = vol.replica_status()
        assert status is not None and status[0] == "degraded", status
    survivors = hci.VolumeStore.replicated(addresses[:2], TOKEN)
    with survivors.open("data", read_only=True) as vol:
        assert vol.read(MiB, 64 * 1024) == pattern(2, 64 * 1024)


def test_replicated_store_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(hci.InvalidSpec):
        hci.VolumeStore.replicated([], TOKEN)
    with pytest.raises(hci.InvalidSpec):
        hci.VolumeStore.replicated(["127.0.0.1:1"], TOKEN, timeout=-1)
    with hci.ReplicaServer(tmp_path / "d", TOKEN) as s:
        wrong = hci.VolumeStore.replicated([s.address], b"wrong token", timeout=1.0)
        with pytest.raises(hci.HciError):
            wrong.create("x", MiB)
