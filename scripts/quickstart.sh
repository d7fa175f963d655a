#!/usr/bin/env bash
# The main job: a single-node hci on an embedded default (redb state and a
# local storage pool in a fresh data directory), shown working:
# hcictl applies examples/quickstart.yaml (a volume and a VM on it), the VM
# boots hci's blk test guest on hci's own KVM VMM, its console is printed,
# the volume is snapshotted and everything is listed. Needs /dev/kvm and gcc.
#
# Usage: scripts/quickstart.sh        (HCI_KEEP=1 leaves the daemon running)
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p hci-daemon -p hci-compute --bins
target=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
bin="$target/release"
dir=$(mktemp -d /tmp/hci-quickstart.XXXXXX)
sock="$dir/hci.sock"

"$bin/hci-daemon" --data-dir "$dir/data" --listen "unix:$sock" --node quickstart \
    2>"$dir/daemon.log" &
daemon=$!
if [ "${HCI_KEEP:-0}" != 1 ]; then
    trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null || true' EXIT
fi
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done

ctl() { echo "\$ hcictl $*"; "$bin/hcictl" --server "unix:$sock" "$@"; }

ctl apply -f examples/quickstart.yaml
ctl vm console demo --until "virtio-blk OK"
echo
ctl get vms
ctl get volumes
ctl volume snapshot demo-disk first
sleep 0.5
ctl get snapshots
ctl get nodes
echo
echo "state: $dir (daemon log: $dir/daemon.log)"
if [ "${HCI_KEEP:-0}" = 1 ]; then
    echo "the daemon keeps running (pid $daemon): hcictl --server unix:$sock get vms"
else
    # The VM runs in its own hci-vmm process and would outlive the daemon:
    # delete it and wait for its process to end.
    ctl delete vm demo
    for _ in $(seq 100); do [ -S "$dir/data/run/demo/api.sock" ] || break; sleep 0.1; done
fi
