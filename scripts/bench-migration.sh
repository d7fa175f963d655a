#!/usr/bin/env bash
# Live-migration benchmark: hci's VMM (two hci-vmm processes on loopback) vs
# QEMU TCG (Debian qemu-system-x86: `migrate` over QMP to `-incoming tcp:`),
# the same `dirty` test guest: 1 GiB of memory, a 512 MiB area filled, then
# rewritten at RATE MiB/s (idle, 50, 200 by default). Both sides get a 50 ms
# downtime target; QEMU's bandwidth cap is lifted (its default is 128 MiB/s).
#
#   scripts/bench-migration.sh
#   RATES=idle,50,200,400 scripts/bench-migration.sh
#   NO_QEMU=1 scripts/bench-migration.sh
#   DISKS=1 scripts/bench-migration.sh   # also ours with a local and a
#                                        # 2-replica volume handed over
#
# Per run: total migration time, pre-copy passes (ours: passes including the
# final one; QEMU: dirty-sync-count), downtime (ours: vCPUs paused on the
# source → the target's "running" answer; QEMU: its `downtime`), bytes sent.
set -euo pipefail
cd "$(dirname "$0")/.."
RATES="${RATES:-idle,50,200}"
if [ -z "${NO_QEMU:-}" ] && ! command -v qemu-system-x86_64 >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >/dev/null
fi
cargo build --release -q -p hci-compute --bin hci-vmm --example migration_bench
T="${CARGO_TARGET_DIR:-target}/release"
ARGS=(--vmm "$T/hci-vmm" --rates "$RATES")
[ -n "${NO_QEMU:-}" ] && ARGS+=(--no-qemu)
[ -n "${DISKS:-}" ] && ARGS+=(--disks)
exec "$T/examples/migration_bench" "${ARGS[@]}"
