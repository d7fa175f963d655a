#!/usr/bin/env bash
# Where the CPU of a replicated write goes: runs one fio job (4k randwrite
# QD32 by default) against `hci-storage serve` in several configurations and
# reads the CPU time (utime + stime from /proc) that each process used during
# the job: fio, the serving process (NBD server + engine + any in-process
# replicas) and each replica server. Prints IOPS and CPU microseconds per I/O
# per process, so a 2-core box's bound is visible: IOPS <= 2e6 / (total
# µs per I/O) when the processes share two cores and nothing else runs.
#
# Configurations: local (a single replica directory, no engine), 1 (engine
# with one in-process replica), 3 in-process (three replica directories in the
# serving process: the engine's fan-out without any network), 3 (one
# in-process + two replica servers, what a node with a replica runs), 3 remote
# (three replica servers).
#
# "engine node bound" = local's total CPU per I/O over this configuration's
# fio + serve: the ratio to local that CPU allows on the engine's node when
# the replica servers run on other machines, as in production (here they
# share the two CPUs, and loopback even charges their TCP input to the
# sender).
#
# With SYSCALLS=1 (needs `perf`, Debian linux-perf, and root) it also counts
# system calls and context switches per I/O in the serving process and in the
# replica servers (perf stat on the raw_syscalls:sys_enter tracepoint).
#
# RATE=N caps fio at N IOPS (fio --rate_iops): CPU per I/O at a fixed rate
# barely moves between runs (±2%), unlike IOPS at saturation (±15% here),
# so it is the figure to compare builds or options by; at saturation the
# batching grows with the load and hides per-request costs.
#
# Usage: scripts/bench-repl-cpu.sh                 (DURATION=5, RW=randwrite)
#        RATE=20000 scripts/bench-repl-cpu.sh
#        RW=randread BS=4k QD=32 scripts/bench-repl-cpu.sh
#        SYSCALLS=1 scripts/bench-repl-cpu.sh
#        HS=/path/to/other/hci-storage scripts/bench-repl-cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
SIZE=${SIZE:-256M}
RW=${RW:-randwrite}
BS=${BS:-4k}
QD=${QD:-32}
RATE=${RATE:-}
RATE_ARGS=()
[ -n "$RATE" ] && RATE_ARGS=(--rate_iops="$RATE")
# THREADS=N passes --threads N to every serve and replica-server (0: one worker
# per CPU; the defaults are 1 for serve, 0 for replica-server).
THREADS=${THREADS:-}
TH=()
[ -n "$THREADS" ] && TH=(--threads "$THREADS")
# PIN=1 models replicas on other nodes: fio and the serving process run on
# CPU 0 only (the engine's node), the replica servers on CPU 1 only.
PIN=${PIN:-0}
NODE=(); REMOTE=()
if [ "$PIN" = 1 ]; then NODE=(taskset -c 0); REMOTE=(taskset -c 1); fi
command -v fio >/dev/null || { echo "bench-repl-cpu: fio missing (scripts/install-deps.sh)" >&2; exit 1; }
if [ -z "${HS:-}" ]; then
  cargo build --release -q -p hci-storage --bin hci-storage
  HS=${CARGO_TARGET_DIR:-target}/release/hci-storage
fi
TCK=$(getconf CLK_TCK)

W=$(mktemp -d /dev/shm/hci-bench-cpu.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT
echo "bench-token-$$" >"$W/token"
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.05; done; echo "no listener on $1" >&2; exit 1; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

for i in 1 2 3; do
  "${REMOTE[@]}" "$HS" replica-server "${TH[@]}" --listen 127.0.0.1:1095$i --root "$W/node$i" --token-file "$W/token" >/dev/null 2>&1 & PIDS+=($!)
  RS[$i]=$!
  wait_port 1095$i
done

declare -A ARGS=(
  [local]="$W/local"
  [1]="--replica $W/e1/v --size $SIZE"
  [3-inproc]="--replica $W/e3a/v --replica $W/e3b/v --replica $W/e3c/v --size $SIZE"
  [3]="--replica $W/e3/v3 --replica 127.0.0.1:10951/v3 --replica 127.0.0.1:10952/v3 --token-file $W/token --size $SIZE"
  [3-remote]="--replica 127.0.0.1:10951/v3r --replica 127.0.0.1:10952/v3r --replica 127.0.0.1:10953/v3r --token-file $W/token --size $SIZE"
)
CONFIGS=(local 1 3-inproc 3 3-remote)
"$HS" create "$W/local" --size "$SIZE" >/dev/null
printf '\n%s %s QD%s, %s s, %s RAM-backed, rate %s, threads %s, pinned %s; CPU µs per I/O by process (loadavg %s)\n\n' "$RW" "$BS" "$QD" "$DURATION" "$SIZE" "${RATE:-unlimited}" "${THREADS:-default}" "$PIN" "$(cut -d' ' -f1 /proc/loadavg)"
SYSCALLS=${SYSCALLS:-0}
if [ "$SYSCALLS" = 1 ] && ! command -v perf >/dev/null; then
  echo "bench-repl-cpu: SYSCALLS=1 needs perf (Debian linux-perf)" >&2; exit 1
fi
if [ "$SYSCALLS" = 1 ]; then
  echo "| config | IOPS | fio | serve (engine) | replica servers | total µs/IO | engine node bound | serve syscalls/IO | serve ctx sw/IO | servers syscalls/IO |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
else
  echo "| config | IOPS | fio | serve (engine) | replica servers | total µs/IO | engine node bound |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
fi
# perf stat of one process during the job: prints "syscalls ctxsw".
pstat_start() { perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$1" -o "$2" 2>/dev/null & }
pstat_read() { awk -F, '/raw_syscalls/{s=$1} /context-switches/{c=$1} END{print (s==""?0:s)+0, (c==""?0:c)+0}' "$1" 2>/dev/null || echo "0 0"; }
port=10960
for c in "${CONFIGS[@]}"; do
  port=$((port + 1))
  # shellcheck disable=SC2086
  "${NODE[@]}" "$HS" serve "${TH[@]}" ${ARGS[$c]} --listen 127.0.0.1:$port >/dev/null 2>&1 & SP=$!
  PIDS+=($SP)
  wait_port $port
  uri=nbd://127.0.0.1:$port/
  fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 --size="$SIZE" --output-format=terse >/dev/null
  s0=$(ticks $SP); r0=0; for i in 1 2 3; do r0=$((r0 + $(ticks "${RS[$i]}"))); done
  PERFS=()
  if [ "$SYSCALLS" = 1 ]; then
    pstat_start $SP "$W/ps.serve"; PERFS+=($!)
    for i in 1 2 3; do pstat_start "${RS[$i]}" "$W/ps.rs$i"; PERFS+=($!); done
  fi
  out=$("${NODE[@]}" fio --name=job --ioengine=nbd --uri="$uri" --rw="$RW" --bs="$BS" --iodepth="$QD" --size="$SIZE" \
        "${RATE_ARGS[@]}" --time_based --runtime="$DURATION" --output-format=json 2>/dev/null)
  s1=$(ticks $SP); r1=0; for i in 1 2 3; do r1=$((r1 + $(ticks "${RS[$i]}"))); done
  sc="0 0 0"
  if [ "$SYSCALLS" = 1 ]; then
    for p in "${PERFS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    for p in "${PERFS[@]}"; do wait "$p" 2>/dev/null || true; done
    read -r ss sw <<<"$(pstat_read "$W/ps.serve")"
    rs=0; for i in 1 2 3; do read -r a _ <<<"$(pstat_read "$W/ps.rs$i")"; rs=$((rs + a)); done
    sc="$ss $sw $rs"
  fi
  kill $SP 2>/dev/null || true; wait $SP 2>/dev/null || true
  python3 -c '
import json,sys
t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]
r=j["read"] if j["read"]["io_bytes"] else j["write"]
ios=r["total_ios"] or 1
tck=int(sys.argv[2]); s=int(sys.argv[3]); rs=int(sys.argv[4])
us=lambda ticks: ticks*1e6/tck/ios
fio=(j["usr_cpu"]+j["sys_cpu"])/100*j["job_runtime"]/1000*1e6/ios
iops=round(r["iops"])
total=fio+us(s)+us(rs)
# The engine node bound: local CPU per I/O over this config'"'"'s CPU on the
# engine'"'"'s node (fio + serve), i.e. the ratio to local that CPU allows when
# the replica servers run on other machines.
if sys.argv[1] == "local":
    open(sys.argv[7], "w").write(str(total))
base=float(open(sys.argv[7]).read())
row=f"| {sys.argv[1]} | {iops} | {fio:.1f} | {us(s):.1f} | {us(rs):.1f} | {total:.1f} | {base/(fio+us(s)):.2f}x |"
if sys.argv[5] == "1":
    ss, sw, rsc = (int(x) for x in sys.argv[6].split())
    row += f" {ss/ios:.2f} | {sw/ios:.2f} | {rsc/ios:.2f} |"
print(row)' \
    "$c" "$TCK" $((s1 - s0)) $((r1 - r0)) "$SYSCALLS" "$sc" "$W/local-total" <<<"$out"
done
