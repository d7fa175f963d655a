#!/usr/bin/env bash
# NBD export benchmark: fio's nbd engine against `hci-storage serve`, `nbdkit file`
# and `qemu-nbd`, all on RAM-backed (/dev/shm) 1 GiB volumes, in one run.
# Prints IOPS / bandwidth per job and the ratio to nbdkit over the same transport.
#
# Usage: scripts/bench-nbd.sh            (DURATION=10 seconds per job by default)
#        DURATION=3 scripts/bench-nbd.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
SIZE=1G
for t in fio nbdkit qemu-nbd python3; do
  command -v "$t" >/dev/null || { echo "bench-nbd: $t missing (scripts/install-deps.sh)" >&2; exit 1; }
done
cargo build --release -q -p hci-storage --bin hci-storage
HS=${CARGO_TARGET_DIR:-target}/release/hci-storage

W=$(mktemp -d /dev/shm/hci-bench-nbd.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT

wait_sock() { for _ in $(seq 200); do [[ -S $1 ]] && return; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

# Servers: ours (a local replica), nbdkit file, qemu-nbd raw file; unix sockets for all
# three, TCP for ours and nbdkit.
"$HS" create "$W/vol" --size "$SIZE" >/dev/null
"$HS" serve "$W/vol" --listen "unix:$W/hci.sock" --listen 127.0.0.1:10911 >/dev/null 2>&1 & PIDS+=($!)
truncate -s "$SIZE" "$W/nbdkit.img" "$W/qemu.img"
nbdkit -f -U "$W/nbdkit.sock" file file="$W/nbdkit.img" & PIDS+=($!)
nbdkit -f -p 10912 file file="$W/nbdkit.img" & PIDS+=($!)
qemu-nbd -f raw -k "$W/qemu.sock" -t --cache=writeback --discard=unmap "$W/qemu.img" & PIDS+=($!)
wait_sock "$W/hci.sock"; wait_sock "$W/nbdkit.sock"; wait_sock "$W/qemu.sock"
sleep 0.5

declare -A URI=(
  [hci-unix]="nbd+unix:///?socket=$W/hci.sock"
  [nbdkit-unix]="nbd+unix:///?socket=$W/nbdkit.sock"
  [qemu-nbd-unix]="nbd+unix:///?socket=$W/qemu.sock"
  [hci-tcp]="nbd://127.0.0.1:10911/"
  [nbdkit-tcp]="nbd://127.0.0.1:10912/"
)
SERVERS=(hci-unix nbdkit-unix qemu-nbd-unix hci-tcp nbdkit-tcp)

# Fill every volume so reads hit data, not holes.
for s in hci-unix nbdkit-unix qemu-nbd-unix; do
  fio --name=fill --ioengine=nbd --uri="${URI[$s]}" --rw=write --bs=1M --iodepth=8 --size=$SIZE \
      --output-format=terse >/dev/null
done

JOBS=("randread-4k-qd1:randread:4k:1" "randread-4k-qd32:randread:4k:32" "randwrite-4k-qd32:randwrite:4k:32"
      "read-1m-qd8:read:1M:8" "write-1m-qd8:write:1M:8")

RESULTS=$W/results.txt
run_job() { # server job rw bs qd
  local out
  out=$(fio --name="$2" --ioengine=nbd --uri="${URI[$1]}" --rw="$3" --bs="$4" --iodepth="$5" --size=$SIZE \
        --time_based --runtime="$DURATION" --ramp_time=1 --output-format=json 2>/dev/null)
  python3 -c '
import json,sys
t=sys.stdin.read()
j=json.loads(t[t.index("{"):])["jobs"][0]
r=j["read"] if j["read"]["io_bytes"] else j["write"]
print(sys.argv[1], sys.argv[2], round(r["iops"]), round(r["bw_bytes"]/1e6,1))' "$1" "$2" <<<"$out" >>"$RESULTS"
}

for spec in "${JOBS[@]}"; do
  IFS=: read -r name rw bs qd <<<"$spec"
  for s in "${SERVERS[@]}"; do run_job "$s" "$name" "$rw" "$bs" "$qd"; done
done

python3 - "$RESULTS" "$DURATION" <<'PY'
import sys, collections
rows = [l.split() for l in open(sys.argv[1])]
res = {(s, j): (int(i), float(b)) for s, j, i, b in rows}
jobs = list(dict.fromkeys(j for _, j, _, _ in rows))
print(f"\nNBD export, fio nbd engine, 1 GiB RAM-backed volumes, {sys.argv[2]} s per job\n")
print("| job | transport | hci IOPS | nbdkit IOPS | qemu-nbd IOPS | hci MB/s | nbdkit MB/s | hci / nbdkit |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for t in ("unix", "tcp"):
    for j in jobs:
        h = res.get((f"hci-{t}", j)); n = res.get((f"nbdkit-{t}", j)); q = res.get((f"qemu-nbd-{t}", j))
        if not h or not n: continue
        ratio = h[0] / n[0] if n[0] else float("nan")
        print(f"| {j} | {t} | {h[0]} | {n[0]} | {q[0] if q else '-'} | {h[1]} | {n[1]} | {ratio:.2f}x |")
PY
