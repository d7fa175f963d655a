#!/usr/bin/env bash
# Replicated volume benchmark: fio's nbd engine against `hci-storage serve`
# exporting (a) a single local replica and (b) a replicated volume on 1, 2 and 3
# `hci-storage replica-server`s, all RAM-backed (/dev/shm) on loopback, plus
# nbdkit file as the outside anchor, in one run. Prints IOPS per job and the
# ratio to the single local replica. (Rebuild timing is not scripted yet: the
# CLI has no `replicas add` command.)
#
# Usage: scripts/bench-repl.sh            (DURATION=10 seconds per job)
#        DURATION=3 SIZE=256M scripts/bench-repl.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
SIZE=${SIZE:-1G}
for t in fio nbdkit python3; do
  command -v "$t" >/dev/null || { echo "bench-repl: $t missing (scripts/install-deps.sh)" >&2; exit 1; }
done
cargo build --release -q -p hci-storage --bin hci-storage
HS=${CARGO_TARGET_DIR:-target}/release/hci-storage

W=$(mktemp -d /dev/shm/hci-bench-repl.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT
echo "bench-token-$$" >"$W/token"

wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.05; done; echo "no listener on $1" >&2; exit 1; }

# Three replica servers.
for i in 1 2 3; do
  "$HS" replica-server --listen 127.0.0.1:1092$i --root "$W/node$i" --token-file "$W/token" >/dev/null 2>&1 & PIDS+=($!)
  wait_port 1092$i
done
# Exports: local replica, and replicated volumes with 1, 2, 3 replicas.
"$HS" create "$W/local" --size "$SIZE" >/dev/null
"$HS" serve "$W/local" --listen 127.0.0.1:10930 >/dev/null 2>&1 & PIDS+=($!)
"$HS" serve --replica 127.0.0.1:10921/r1 --token-file "$W/token" --size "$SIZE" --listen 127.0.0.1:10931 >/dev/null 2>&1 & PIDS+=($!)
"$HS" serve --replica 127.0.0.1:10921/r2 --replica 127.0.0.1:10922/r2 --token-file "$W/token" --size "$SIZE" \
  --listen 127.0.0.1:10932 >/dev/null 2>&1 & PIDS+=($!)
"$HS" serve --replica 127.0.0.1:10921/r3 --replica 127.0.0.1:10922/r3 --replica 127.0.0.1:10923/r3 \
  --token-file "$W/token" --size "$SIZE" --listen 127.0.0.1:10933 >/dev/null 2>&1 & PIDS+=($!)
truncate -s "$SIZE" "$W/nbdkit.img"
nbdkit -f -p 10934 file file="$W/nbdkit.img" & PIDS+=($!)
for p in 10930 10931 10932 10933 10934; do wait_port $p; done

declare -A URI=([local]=nbd://127.0.0.1:10930/ [repl1]=nbd://127.0.0.1:10931/ [repl2]=nbd://127.0.0.1:10932/
                [repl3]=nbd://127.0.0.1:10933/ [nbdkit]=nbd://127.0.0.1:10934/)
SERVERS=(local repl1 repl2 repl3 nbdkit)
for s in "${SERVERS[@]}"; do
  fio --name=fill --ioengine=nbd --uri="${URI[$s]}" --rw=write --bs=1M --iodepth=8 --size="$SIZE" \
      --output-format=terse >/dev/null
done

JOBS=("randwrite-4k-qd32:randwrite:4k:32" "randread-4k-qd32:randread:4k:32" "randwrite-4k-qd1:randwrite:4k:1"
      "write-1m-qd8:write:1M:8" "read-1m-qd8:read:1M:8")
RESULTS=$W/results.txt
run_job() { # server job rw bs qd
  local out
  out=$(fio --name="$2" --ioengine=nbd --uri="${URI[$1]}" --rw="$3" --bs="$4" --iodepth="$5" --size="$SIZE" \
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

python3 - "$RESULTS" "$DURATION" "$SIZE" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])]
res = {(s, j): (int(i), float(b)) for s, j, i, b in rows}
jobs = list(dict.fromkeys(j for _, j, _, _ in rows))
print(f"\nReplicated volumes over loopback, fio nbd engine, {sys.argv[3]} RAM-backed, {sys.argv[2]} s per job\n")
print("| job | local IOPS | 1 replica | 2 replicas | 3 replicas | nbdkit | 3 replicas / local |")
print("|---|---:|---:|---:|---:|---:|---:|")
for j in jobs:
    g = lambda s: res.get((s, j), (0, 0))[0]
    l = g("local")
    print(f"| {j} | {l} | {g('repl1')} | {g('repl2')} | {g('repl3')} | {g('nbdkit')} | {g('repl3') / l if l else float('nan'):.2f}x |")
PY
