#!/usr/bin/env bash
# Interleaved A/B of hci-storage builds on a replicated volume: for each
# build, two replica servers and an engine (`serve`) with one in-process
# replica plus the two remote ones, all on /dev/shm; then ROUNDS rounds of a
# 4 s fio nbd job (4k, QD32) alternating between the builds. Prints IOPS and
# the CPU µs per I/O of the engine plus its replica servers (utime+stime from
# /proc), which load from other processes disturbs far less than IOPS.
#
# RATE=N caps fio at N IOPS: the CPU per I/O at a fixed rate is stable to
# ±2% between rounds, the figure to decide by (IOPS at saturation swing
# ±15% on this box).
#
# Usage: scripts/bench-repl-ab.sh ROUNDS randwrite|randread HS_A HS_B [HS_C …]
#        RATE=20000 scripts/bench-repl-ab.sh 3 randwrite HS_A HS_B
# (each HS a path to an hci-storage binary, or a wrapper script adding options)
set -euo pipefail
command -v fio >/dev/null || { echo "bench-repl-ab: fio missing (scripts/install-deps.sh)" >&2; exit 1; }
[ $# -ge 3 ] || { echo "usage: $0 ROUNDS randwrite|randread HS_A [HS_B …]" >&2; exit 2; }
ROUNDS=$1; RW=$2; shift 2
RATE_ARGS=()
[ -n "${RATE:-}" ] && RATE_ARGS=(--rate_iops="$RATE")
TCK=$(getconf CLK_TCK)
W=$(mktemp -d /dev/shm/hci-bench-ab.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
echo "bench-token-$$" >"$W/token"
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.05; done; echo "no listener on $1" >&2; exit 1; }
ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }

GROUP=()
k=0
for hs in "$@"; do
  k=$((k + 1)); g=""
  for i in 1 2; do
    "$hs" replica-server --listen 127.0.0.1:110$k$i --root "$W/n$k$i" --token-file "$W/token" >/dev/null 2>&1 &
    PIDS+=($!); g="$g $!"
    wait_port 110$k$i
  done
  "$hs" serve --replica "$W/e$k/v" --replica 127.0.0.1:110${k}1/v --replica 127.0.0.1:110${k}2/v \
    --token-file "$W/token" --size 256M --listen 127.0.0.1:110${k}5 >/dev/null 2>&1 &
  PIDS+=($!); g="$g $!"
  wait_port 110${k}5
  GROUP[$k]=$g
  fio --name=fill --ioengine=nbd --uri=nbd://127.0.0.1:110${k}5/ --rw=write --bs=1M --iodepth=8 --size=256M \
      --output-format=terse >/dev/null 2>&1
done
for r in $(seq "$ROUNDS"); do
  line="round $r:"; k=0
  for hs in "$@"; do
    k=$((k + 1))
    # shellcheck disable=SC2086
    t0=$(ticks ${GROUP[$k]})
    out=$(fio --name=job --ioengine=nbd --uri=nbd://127.0.0.1:110${k}5/ --rw="$RW" --bs=4k --iodepth=32 --size=256M \
          "${RATE_ARGS[@]}" --time_based --runtime=4 --output-format=json 2>/dev/null)
    # shellcheck disable=SC2086
    t1=$(ticks ${GROUP[$k]})
    line="$line $(python3 -c '
import json,sys
t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]
r=j["read"] if j["read"]["io_bytes"] else j["write"]
ios=r["total_ios"] or 1
us=(int(sys.argv[2])*1e6/int(sys.argv[3]))/ios
iops=round(r["iops"])
print(f"{sys.argv[1]}={iops} IOPS {us:.1f} µs/IO;")' "$(basename "$hs")" $((t1 - t0)) "$TCK" <<<"$out")"
  done
  echo "$line (load $(cut -d' ' -f1 /proc/loadavg))"
done
