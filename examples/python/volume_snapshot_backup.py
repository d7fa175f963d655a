#!/usr/bin/env python3
"""Snapshot a volume and back it up, in-process (no daemon needed).

Creates a thin volume in a local store, writes to it, snapshots it, backs
the snapshot up to a filesystem target, changes a few blocks, takes an
incremental backup, verifies both and restores the latest into a new
volume, checking every byte.

    python3 examples/python/volume_snapshot_backup.py [WORKDIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import hci

MiB = 1 << 20


def main(workdir: Path) -> None:
    """Runs the example in ``workdir``."""
    store = hci.VolumeStore(workdir / "volumes")
    store.create("app-data", 64 * MiB)
    repo = hci.BackupRepository.init((workdir / "backups").as_uri())

    with store.open("app-data") as vol:
        for i in range(256):
            vol.write(i * 64 * 1024, f"record {i:04d}\n".encode() * 16)
        vol.flush()
        vol.snapshot("monday")
        full = repo.backup(store, "app-data", "monday", metadata={"app": "example"})
        print(f"full backup {full.id}: {full.added_bytes} bytes stored")

        vol.write(0, b"changed on tuesday\n" * 100)
        vol.snapshot("tuesday")
        incr = repo.backup(store, "app-data", "tuesday", base=full.id)
        print(f"incremental backup {incr.id}: {incr.added_bytes} bytes stored")
        expected = vol.read(0, vol.size)

        allocated = sum(e.length for e in vol.block_status() if e.kind == "data")
        print(f"volume: {vol.size // MiB} MiB, {allocated // 1024} KiB allocated")

    for b in repo.list():
        report = repo.verify(b.id)
        print(f"verify {b.id}: {report.chunks_checked} pieces, ok={report.ok}")
        if not report.ok:
            raise SystemExit(f"backup {b.id} is damaged: {report.bad_chunks}")

    store.create("app-data-restored", 64 * MiB)
    with store.open("app-data-restored") as restored:
        repo.restore(incr.id, restored)
        if restored.read(0, restored.size) != expected:
            raise SystemExit("the restored volume differs from the snapshot")
    print("restore OK: the restored volume matches snapshot 'tuesday'")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as d:
            main(Path(d))
