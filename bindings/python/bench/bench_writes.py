#!/usr/bin/env python3
"""4 KiB volume writes per second from Python vs from Rust, same volume.

The Rust loop (``VolumeHandle._bench_rust_writes``) calls the same block
device directly; the Python loop pays for the binding on every write
(argument conversion, GIL release and re-acquire, runtime entry). The
ratio is the binding overhead.

    python3 bindings/python/bench/bench_writes.py [COUNT]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import hci

BLOCK = 4096
SPAN = 64 << 20


def measure(count: int) -> tuple[float, float]:
    """Returns (python writes/s, rust writes/s), best of three each."""
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as d:
        store = hci.VolumeStore(Path(d) / "vols")
        store.create("bench", SPAN)
        with store.open("bench") as vol:
            buf = b"\x5a" * BLOCK
            blocks = SPAN // BLOCK
            # Warm up: allocate every block once so both loops overwrite.
            vol._bench_rust_writes(blocks)
            py_best = rust_best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                write = vol.write
                for i in range(count):
                    write((i % blocks) * BLOCK, buf)
                py_best = min(py_best, time.perf_counter() - start)
                rust_best = min(rust_best, vol._bench_rust_writes(count))
    return count / py_best, count / rust_best


def main() -> None:
    """Prints both rates and their ratio."""
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    py_rate, rust_rate = measure(count)
    print(f"4 KiB writes/s  python: {py_rate:,.0f}  rust: {rust_rate:,.0f}  "
          f"ratio python/rust: {py_rate / rust_rate:.2f}")


if __name__ == "__main__":
    main()
