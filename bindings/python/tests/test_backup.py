"""Backups through the filesystem target: full, incremental, restore,
list, verify, delete, encryption."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

import hci

MiB = 1 << 20


def fill(vol: hci.VolumeHandle, seed: int, blocks: list[int]) -> None:
    for b in blocks:
        vol.write(b * 4096, bytes([(seed + b) % 256]) * 4096)


def test_backup_and_restore_through_a_file_target(
    store: hci.VolumeStore, tmp_path: Path
) -> None:
    url = (tmp_path / "target").as_uri()
    repo = hci.BackupRepository.init(url)
    assert repo.url == url and repo.list() == []

    store.create("data", 8 * MiB)
    with store.open("data") as vol:
        fill(vol, 1, list(range(0, 2048, 3)))
        vol.snapshot("s1")
        full = repo.backup(store, "data", "s1", metadata={"app": "pytest"})
        assert full.volume == "data" and full.snapshot == "s1" and full.base is None
        assert full.size == 8 * MiB and full.added_bytes > 0
        assert full.metadata == {"app": "pytest"}

        # Incremental: only the changed blocks are read and stored.
        fill(vol, 9, [5, 6, 7])
        vol.snapshot("s2")
        incr = repo.backup(store, "data", "s2", base=full.id)
        assert incr.base == full.id
        assert incr.added_bytes < full.added_bytes
        expected_s2 = vol.read(0, 8 * MiB)

    assert [b.id for b in repo.list()] == [full.id, incr.id]
    report = repo.verify(incr.id)
    assert report.ok and report.chunks_checked > 0 and report.bad_chunks == []

    # Restore into a new volume and compare byte for byte.
    store.create("restored", 8 * MiB)
    with store.open("restored") as dst:
        dst.write(100 * 4096, b"junk" * 1024)  # restore overwrites everything
        repo.restore(incr.id, dst)
        assert dst.read(0, 8 * MiB) == expected_s2

    # A reopened repository sees the same backups; deleting one works.
    again = hci.BackupRepository.open(url)
    assert [b.id for b in again.list()] == [full.id, incr.id]
    again.delete(incr.id)
    assert [b.id for b in again.list()] == [full.id]
    with pytest.raises(hci.NotFound):
        again.verify(incr.id)


def test_restore_needs_room_and_an_existing_backup(
    store: hci.VolumeStore, tmp_path: Path
) -> None:
    repo = hci.BackupRepository.init((tmp_path / "t").as_uri())
    store.create("v", 4 * MiB)
    store.snapshot("v", "s")
    b = repo.backup(store, "v", "s")
    store.create("tiny", MiB)
    with store.open("tiny") as tiny:
        with pytest.raises(hci.InvalidSpec, match="smaller than the backup"):
            repo.restore(b.id, tiny)
        with pytest.raises(hci.NotFound):
            repo.restore("no-such-backup", tiny)
    with pytest.raises(hci.NotFound):
        repo.backup(store, "v", "no-such-snapshot")


def test_encrypted_repositories_refuse_a_wrong_key(
    store: hci.VolumeStore, tmp_path: Path
) -> None:
    url = (tmp_path / "enc").as_uri()
    key = os.urandom(32)
    repo = hci.BackupRepository.init(url, key=key)
    store.create("v", MiB)
    with store.open("v") as vol:
        vol.write(0, b"secret" * 100)
    store.snapshot("v", "s")
    repo.backup(store, "v", "s")
    with pytest.raises(hci.HciError) as e:
        hci.BackupRepository.open(url, key=os.urandom(32))
    assert isinstance(e.value, (hci.Corrupt, hci.InvalidSpec, hci.PermissionDenied))
    with pytest.raises(hci.InvalidSpec, match="32 bytes"):
        hci.BackupRepository.open(url, key=b"short")
    with pytest.raises(hci.InvalidSpec):
        hci.BackupRepository.init("ftp://nowhere/x")


def test_asyncio_backups_run_concurrently(store: hci.VolumeStore, tmp_path: Path) -> None:
    repo = hci.BackupRepository.init((tmp_path / "t").as_uri())
    for name in ("a", "b", "c"):
        store.create(name, 4 * MiB)
        with store.open(name) as vol:
            fill(vol, ord(name), list(range(0, 1024, 2)))
        store.snapshot(name, "s")

    async def all_backups() -> list[hci.BackupInfo]:
        return await asyncio.gather(
            *(hci.aio.backup(repo, store, n, "s") for n in ("a", "b", "c"))
        )

    infos = asyncio.run(all_backups())
    assert sorted(i.volume for i in infos) == ["a", "b", "c"]
    async def all_verified() -> list[hci.VerifyReport]:
        return await asyncio.gather(*(hci.aio.verify(repo, i.id) for i in infos))

    assert all(r.ok for r in asyncio.run(all_verified()))
