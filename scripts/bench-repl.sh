#!/usr/bin/env bash
# Replicated volume benchmark: fio's nbd engine against `hci-storage serve`
# exporting (a) a single local replica directory and (b) replicated volumes
# whose engine holds one replica in-process (as a VMM or NBD server on the
# node with a replica does) plus 0, 1 or 2 replicas on `hci-storage
# replica-server`s, and (c) 3 replicas all on replica servers (no local one),
# all RAM-backed (/dev/shm) on loopback, plus nbdkit file as the outside
# anchor, in one run. Prints IOPS per job and the ratio to the single local
# replica.
#
# Then (unless REBUILD=0) the rebuild benchmark: a REBUILD_SIZE volume (4G)
# with REBUILD_DATA (1G) allocated in 1 MiB extents spread over the volume is
# served from one replica server, and `hci-storage replicas add --wait` adds
# an empty replica on another: time, MiB/s and bytes sent.
#
# With PIN=1 the run models replicas on other nodes: fio and every serving
# process (local, engines, nbdkit) run on CPU 0 only, the replica servers on
# CPU 1 only, so remote replicas no longer take CPU from the engine's node
# (loopback still runs the receiver's TCP input on the sender's CPU).
#
# Usage: scripts/bench-repl.sh            (ROUNDS=3 of DURATION=5 seconds per job and server)
#        DURATION=3 SIZE=256M scripts/bench-repl.sh
#        PIN=1 REBUILD=0 scripts/bench-repl.sh
#        REPLICA_SERVERS="10.0.0.2:7000 10.0.0.3:7000 10.0.0.4:7000" TOKEN_FILE=tok REBUILD=0 scripts/bench-repl.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-1G}
for t in fio nbdkit python3; do
  command -v "$t" >/dev/null || { echo "bench-repl: $t missing (scripts/install-deps.sh)" >&2; exit 1; }
done
# HS=path/to/hci-storage runs another build (e.g. an older one for an A/B).
if [ -z "${HS:-}" ]; then
  cargo build --release -q -p hci-storage --bin hci-storage
  HS=${CARGO_TARGET_DIR:-target}/release/hci-storage
fi
REBUILD=${REBUILD:-1}
PIN=${PIN:-0}
NODE=(); REMOTE=()
if [ "$PIN" = 1 ]; then NODE=(taskset -c 0); REMOTE=(taskset -c 1); fi
REBUILD_SIZE=${REBUILD_SIZE:-4G}
REBUILD_DATA=${REBUILD_DATA:-1G}

W=$(mktemp -d /dev/shm/hci-bench-repl.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT
echo "bench-token-$$" >"$W/token"

wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.05; done; echo "no listener on $1" >&2; exit 1; }

# Three replica servers: started here on loopback, or REPLICA_SERVERS="A:PORT
# B:PORT C:PORT" already running on other machines (RAM-backed roots, e.g.
# `hci-storage replica-server --listen 0.0.0.0:7000 --root /dev/shm/bench
# --token-file F`), with TOKEN_FILE holding their token. Their volumes are
# named after this run (…-PID) and stay on those servers afterwards. The
# rebuild part always runs on loopback.
if [ -n "${REPLICA_SERVERS:-}" ]; then
  read -r -a RS <<<"$REPLICA_SERVERS"
  [ "${#RS[@]}" = 3 ] || { echo "bench-repl: REPLICA_SERVERS needs three HOST:PORT" >&2; exit 2; }
  [ -n "${TOKEN_FILE:-}" ] || { echo "bench-repl: REPLICA_SERVERS needs TOKEN_FILE" >&2; exit 2; }
  cp "$TOKEN_FILE" "$W/token"
  V=-$$
else
  RS=(127.0.0.1:10921 127.0.0.1:10922 127.0.0.1:10923)
  V=
  for i in 1 2 3; do
    "${REMOTE[@]}" "$HS" replica-server --listen 127.0.0.1:1092$i --root "$W/node$i" --token-file "$W/token" >/dev/null 2>&1 & PIDS+=($!)
    wait_port 1092$i
  done
fi
# Exports: local replica; replicated volumes with an in-process replica plus
# 0, 1, 2 remote ones; 3 remote replicas.
"$HS" create "$W/local" --size "$SIZE" >/dev/null
"${NODE[@]}" "$HS" serve "$W/local" --listen 127.0.0.1:10930 >/dev/null 2>&1 & PIDS+=($!)
"${NODE[@]}" "$HS" serve --replica "$W/engine1/r1" --size "$SIZE" --listen 127.0.0.1:10931 >/dev/null 2>&1 & PIDS+=($!)
"${NODE[@]}" "$HS" serve --replica "$W/engine2/r2$V" --replica "${RS[0]}/r2$V" --token-file "$W/token" --size "$SIZE" \
  --listen 127.0.0.1:10932 >/dev/null 2>&1 & PIDS+=($!)
"${NODE[@]}" "$HS" serve --replica "$W/engine3/r3$V" --replica "${RS[0]}/r3$V" --replica "${RS[1]}/r3$V" \
  --token-file "$W/token" --size "$SIZE" --listen 127.0.0.1:10933 >/dev/null 2>&1 & PIDS+=($!)
"${NODE[@]}" "$HS" serve --replica "${RS[0]}/r3r$V" --replica "${RS[1]}/r3r$V" --replica "${RS[2]}/r3r$V" \
  --token-file "$W/token" --size "$SIZE" --listen 127.0.0.1:10935 >/dev/null 2>&1 & PIDS+=($!)
truncate -s "$SIZE" "$W/nbdkit.img"
"${NODE[@]}" nbdkit -f -p 10934 file file="$W/nbdkit.img" & PIDS+=($!)
for p in 10930 10931 10932 10933 10934 10935; do wait_port $p; done

declare -A URI=([local]=nbd://127.0.0.1:10930/ [repl1]=nbd://127.0.0.1:10931/ [repl2]=nbd://127.0.0.1:10932/
                [repl3]=nbd://127.0.0.1:10933/ [nbdkit]=nbd://127.0.0.1:10934/ [repl3r]=nbd://127.0.0.1:10935/)
SERVERS=(local repl1 repl2 repl3 repl3r nbdkit)
for s in "${SERVERS[@]}"; do
  fio --name=fill --ioengine=nbd --uri="${URI[$s]}" --rw=write --bs=1M --iodepth=8 --size="$SIZE" \
      --output-format=terse >/dev/null
done

JOBS=("randwrite-4k-qd32:randwrite:4k:32" "randread-4k-qd32:randread:4k:32" "randwrite-4k-qd1:randwrite:4k:1"
      "write-1m-qd8:write:1M:8" "read-1m-qd8:read:1M:8")
RESULTS=$W/results.txt
run_job() { # server job rw bs qd
  local out
  out=$("${NODE[@]}" fio --name="$2" --ioengine=nbd --uri="${URI[$1]}" --rw="$3" --bs="$4" --iodepth="$5" --size="$SIZE" \
        --time_based --runtime="$DURATION" --ramp_time=1 --output-format=json 2>/dev/null)
  python3 -c '
import json,sys
t=sys.stdin.read()
j=json.loads(t[t.index("{"):])["jobs"][0]
r=j["read"] if j["read"]["io_bytes"] else j["write"]
print(sys.argv[1], sys.argv[2], round(r["iops"]), round(r["bw_bytes"]/1e6,1))' "$1" "$2" <<<"$out" >>"$RESULTS"
}
# ROUNDS rounds per job, the servers taking turns within each, and the median
# reported: on a shared 2-vCPU VM one server's run can land in a slow
# period (±20% between identical runs), which a single sample turns into a
# false ratio.
for spec in "${JOBS[@]}"; do
  IFS=: read -r name rw bs qd <<<"$spec"
  for _ in $(seq "$ROUNDS"); do
    for s in "${SERVERS[@]}"; do run_job "$s" "$name" "$rw" "$bs" "$qd"; done
  done
done

python3 - "$RESULTS" "$DURATION" "$SIZE" "$PIN" <<'PY'
import sys
import statistics
rows = [l.split() for l in open(sys.argv[1])]
samples = {}
for s, j, i, b in rows:
    samples.setdefault((s, j), []).append(int(i))
res = {k: round(statistics.median(v)) for k, v in samples.items()}
rounds = max(len(v) for v in samples.values())
jobs = list(dict.fromkeys(j for _, j, _, _ in rows))
print(f"\nReplicated volumes over loopback, fio nbd engine, {sys.argv[3]} RAM-backed, median IOPS of {rounds} rounds of {sys.argv[2]} s per job")
print("(N replicas = one in the serving process + N-1 on replica servers; 3 remote = all on replica servers)")
if sys.argv[4] == "1":
    print("(pinned: fio and the serving processes on CPU 0, the replica servers on CPU 1)")
print()
print("| job | local IOPS | 1 replica | 2 replicas | 3 replicas | 3 remote | nbdkit | 3 replicas / local | 3 remote / local | 3 replicas / local, per round |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for j in jobs:
    g = lambda s: res.get((s, j), 0)
    l = g("local")
    r = lambda s: f"{g(s) / l:.2f}x" if l else "n/a"
    # Ratios within each round (the two ran seconds apart), lowest to highest.
    per = sorted(a / b for a, b in zip(samples.get(("repl3", j), []), samples.get(("local", j), [])) if b)
    spread = f"{per[0]:.2f}–{per[-1]:.2f}x" if per else "n/a"
    print(f"| {j} | {l} | {g('repl1')} | {g('repl2')} | {g('repl3')} | {g('repl3r')} | {g('nbdkit')} | {r('repl3')} | {r('repl3r')} | {spread} |")
PY

[ "$REBUILD" = 1 ] || exit 0
# Rebuild: stop the I/O benchmark's servers first (CPU and RAM for the copy).
for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
PIDS=()
rm -rf "$W"/node* "$W"/engine* "$W"/local "$W/nbdkit.img"
for i in 1 2; do
  "$HS" replica-server --listen 127.0.0.1:1094$i --root "$W/rb$i" --token-file "$W/token" >/dev/null 2>&1 & PIDS+=($!)
  wait_port 1094$i
done
"$HS" serve --replica 127.0.0.1:10941/rb --token-file "$W/token" --size "$REBUILD_SIZE" --control "$W/ctl.sock" \
  ${REBUILD_RATE:+--rebuild-rate "$REBUILD_RATE"} --listen 127.0.0.1:10940 >/dev/null 2>&1 & PIDS+=($!)
wait_port 10940
# 1 MiB of random data in every REBUILD_SIZE/REBUILD_DATA MiB (1 in 4 by default).
to_mib() { python3 -c 'import sys; s=sys.argv[1]; u={"K":1/1024,"M":1,"G":1024,"T":1<<20}; print(int(float(s[:-1])*u[s[-1]]) if s[-1] in u else int(s)>>20)' "$1"; }
STRIDE=$(( $(to_mib "$REBUILD_SIZE") / $(to_mib "$REBUILD_DATA") ))
fio --name=populate --ioengine=nbd --uri=nbd://127.0.0.1:10940/ --rw=write:$(( STRIDE - 1 ))M --bs=1M --iodepth=8 \
    --size="$REBUILD_SIZE" --refill_buffers --output-format=terse >/dev/null
echo
echo "Rebuild: $REBUILD_SIZE volume, $REBUILD_DATA allocated (1 MiB in every $STRIDE MiB), one replica server to an empty one${REBUILD_RATE:+, rate limit $REBUILD_RATE/s}"
"$HS" replicas add --control "$W/ctl.sock" 127.0.0.1:10942/rb --wait
"$HS" replicas list --control "$W/ctl.sock"
