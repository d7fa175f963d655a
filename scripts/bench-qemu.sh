#!/usr/bin/env bash
# QEMU backend disk benchmark: a real Linux guest (Debian cloud kernel,
# busybox initramfs, TCG here) writes (fsync) and reads 64 MiB on its virtio
# disk backed by a raw file that QEMU opens itself (the peer), an hci-storage
# local volume served to QEMU over NBD by the calling process, and a
# 2-replica replicated volume over NBD. Prints MB/s and ratios to the raw
# file. Needs root, qemu-system-x86, linux-image-cloud-amd64, busybox-static
# (scripts/install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release -q -p hci-compute --test qemu_linux -- \
    --ignored --nocapture --exact bench_guest_disk_nbd_vs_raw_file 2>&1 |
    grep -E '^\|'
