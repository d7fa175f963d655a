"""The in-process volume API against the behaviours of the Rust
conformance suite: writes, unaligned I/O, ranges, snapshots, revert, clone,
expand, block status, encryption, NBD export."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

import hci

MiB = 1 << 20


def pattern(seed: int, n: int) -> bytes:
    return bytes((seed + i * 7) % 251 for i in range(n))


def test_write_read_round_trip(store: hci.VolumeStore) -> None:
    info = store.create("data", 8 * MiB)
    assert (info.name, info.size, info.snapshots, info.encrypted) == ("data", 8 * MiB, 0, False)
    with store.open("data") as vol:
        assert vol.size == 8 * MiB and not vol.read_only
        assert vol.read(0, 4096) == bytes(4096), "a new volume reads as zeroes"
        data = pattern(1, 64 * 1024)
        vol.write(4096, data)
        assert vol.read(4096, len(data)) == data
        # Unaligned I/O and bytearray payloads.
        vol.write(100001, bytearray(b"unaligned"))
        vol.write(200000, b"view")
        assert vol.read(100001, 9) == b"unaligned"
        assert vol.read(200000, 4) == b"view"
        vol.write(8 * MiB - 3, b"end", fua=True)
        vol.flush()
        assert vol.read(8 * MiB - 3, 3) == b"end"
    assert vol.closed
    # The data survives reopening.
    with store.open("data") as vol:
        assert vol.read(4096, 64 * 1024) == data


def test_ranges_outside_the_device_are_refused(store: hci.VolumeStore) -> None:
    store.create("small", MiB)
    with store.open("small") as vol:
        with pytest.raises(hci.OutOfRange, match="outside the device of 1048576 bytes"):
            vol.write(MiB - 1, b"xx")
        with pytest.raises(hci.OutOfRange):
            vol.read(MiB, 1)
        with pytest.raises(OverflowError):
            vol.read(-1, 1)


def test_snapshot_revert_and_clone(store: hci.VolumeStore) -> None:
    store.create("vm-disk", 4 * MiB)
    vol = store.open("vm-disk")
    vol.write(0, b"A" * 4096)
    s1 = vol.snapshot("s1")
    assert s1.name == "s1" and s1.size == 4 * MiB and s1.created.tzinfo is not None
    vol.write(0, b"B" * 4096)
    vol.write(MiB, b"C" * 4096)
    vol.snapshot("s2")
    vol.write(0, b"D" * 4096)
    assert [s.name for s in vol.snapshots()] == ["s1", "s2"]
    assert store.info("vm-disk").snapshots == 2

    # Snapshots read as they were taken.
    with store.open_snapshot("vm-disk", "s1") as snap:
        assert snap.read_only and snap.snapshot_name == "s1"
        assert snap.read(0, 4096) == b"A" * 4096
        assert snap.read(MiB, 4096) == bytes(4096)
        with pytest.raises(hci.ReadOnly):
            snap.write(0, b"x")

    # Changed blocks between snapshots: at least the rewritten ranges.
    changed = store.changed_blocks("vm-disk", "s1", "s2")
    covered = lambda off: any(o <= off < o + n for o, n in changed)  # noqa: E731
    assert covered(0) and covered(MiB)

    # Clone s2 into a new volume, independent of the source.
    info = vol.clone("s2", "copy")
    assert info.name == "copy" and info.size == 4 * MiB
    with store.open("copy") as copy:
        assert copy.read(0, 4096) == b"B" * 4096
        assert copy.read(MiB, 4096) == b"C" * 4096
        copy.write(0, b"E" * 4096)
    assert vol.read(0, 4096) == b"D" * 4096

    # Revert: the head reads as s1 again; newer snapshots stay.
    vol.revert("s1")
    assert vol.read(0, 4096) == b"A" * 4096
    assert vol.read(MiB, 4096) == bytes(4096)
    assert [s.name for s in store.snapshots("vm-disk")] == ["s1", "s2"]

    # Deleting a snapshot keeps the content of the others.
    store.delete_snapshot("vm-disk", "s1")
    assert vol.read(0, 4096) == b"A" * 4096
    with store.open_snapshot("vm-disk", "s2") as snap:
        assert snap.read(0, 4096) == b"B" * 4096
    vol.close()

    with pytest.raises(hci.NotFound, match="s1"):
        store.revert("vm-disk", "s1")
    with pytest.raises(hci.AlreadyExists):
        store.snapshot("vm-disk", "s2")


def test_expand_and_block_status(store: hci.VolumeStore) -> None:
    store.create("grow", 2 * MiB)
    with store.open("grow") as vol:
        assert [(e.offset, e.length, e.kind) for e in vol.block_status()] == [
            (0, 2 * MiB, "hole")
        ]
        vol.write(64 * 1024, b"x" * 8192)
        ext = vol.block_status()
        assert [(e.kind, e.offset, e.length) for e in ext if e.kind == "data"] == [
            ("data", 64 * 1024, 8192)
        ]
        assert ext[0].reads_zero and sum(e.length for e in ext) == 2 * MiB
        vol.write_zeroes(64 * 1024, 4096)
        assert vol.read(64 * 1024, 4096) == bytes(4096)
        vol.discard(68 * 1024, 4096)
        info = vol.expand(6 * MiB)
        assert info.size == 6 * MiB and vol.size == 6 * MiB
        assert vol.read(5 * MiB, 4096) == bytes(4096), "new space reads as zeroes"
        vol.write(6 * MiB - 4096, b"y" * 4096)
        with pytest.raises(hci.InvalidSpec):
            vol.expand(MiB)


def test_store_errors_map_to_exceptions(store: hci.VolumeStore) -> None:
    with pytest.raises(hci.NotFound, match='volume "ghost" not found'):
        store.open("ghost")
    store.create("one", MiB)
    with pytest.raises(hci.AlreadyExists) as e:
        store.create("one", MiB)
    assert isinstance(e.value, hci.Conflict) and isinstance(e.value, hci.HciError)
    with pytest.raises(hci.InvalidSpec, match="volume name"):
        store.create("../escape", MiB)
    with pytest.raises(hci.InvalidSpec):
        store.create("odd", 1000)
    assert [v.name for v in store.list()] == ["one"]
    store.delete("one")
    assert store.list() == []


def test_closed_handles_refuse_io(store: hci.VolumeStore) -> None:
    store.create("c", MiB)
    vol = store.open("c")
    vol.close()
    with pytest.raises(hci.HciError, match="closed"):
        vol.read(0, 1)


def test_encrypted_volumes_need_their_key(store: hci.VolumeStore) -> None:
    key = os.urandom(64)
    info = store.create("secret", MiB, encryption_key=key)
    assert info.encrypted
    with store.open("secret", encryption_key=key) as vol:
        vol.write(0, b"classified")
    # The data is not on disk in clear.
    raw = b"".join(p.read_bytes() for p in Path(store.root, "secret").glob("layer-*.img"))
    assert b"classified" not in raw
    other = hci.VolumeStore(store.root)
    with pytest.raises(hci.InvalidSpec, match="key is required"):
        other.open("secret")
    with pytest.raises((hci.Corrupt, hci.InvalidSpec)):
        other.open("secret", encryption_key=os.urandom(64))


def test_threads_share_a_volume_with_the_gil_released(store: hci.VolumeStore) -> None:
    store.create("shared", 16 * MiB)
    vol = store.open("shared")
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(200):
                off = (n * 200 + i) * 4096
                vol.write(off, bytes([n]) * 4096)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for n in range(4):
        assert vol.read(n * 200 * 4096, 4096) == bytes([n]) * 4096
    vol.close()


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io (qemu-utils)")
def test_nbd_export_serves_a_real_client(store: hci.VolumeStore) -> None:
    store.create("exported", 4 * MiB)
    with store.open("exported") as vol:
        vol.write(0, b"\x11" * 65536)
        with vol.export_nbd() as export:
            assert export.uri.startswith("nbd://127.0.0.1:") and export.address is not None
            out = subprocess.run(
                ["qemu-io", "-f", "raw", "-c", "read -P 0x11 0 64k", "-c",
                 "write -P 0x22 1M 64k", "-c", "flush", export.uri],
                capture_output=True, text=True, timeout=60,
            )
            assert out.returncode == 0 and "Pattern verification failed" not in out.stdout, (
                out.stdout + out.stderr
            )
        assert vol.read(MiB, 65536) == b"\x22" * 65536
