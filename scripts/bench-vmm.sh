#!/usr/bin/env bash
# VMM benchmark: hci's KVM VMM vs QEMU (Debian qemu-system-x86) on the same
# PVH test guest, run side by side, medians of RUNS runs, ratios printed.
#
#   scripts/bench-vmm.sh            # RUNS=10 by default
#   RUNS=20 scripts/bench-vmm.sh
#
# Measures, from process spawn, as seen by this harness on the process's stdout:
#   - time to the guest's first serial byte, and to process exit (hello guest:
#     prints one line, resets through the i8042);
#   - VMM memory overhead: RSS minus the RSS of the guest-RAM mapping, while the
#     spin guest runs (64 MiB guest);
#   - 4 KiB read IOPS at queue depth 1 from the blk guest (polling virtio-blk
#     driver at CPL3) against the same RAM-backed file in /dev/shm, timed
#     between its "reads start" and "reads done" lines (QEMU: -M microvm,
#     virtio-blk-device; ours: the file served through a BlockDevice).
# Peers: QEMU TCG `-M pc` (as in BRIEF.md) and `-M microvm` (no i8042 there, so
# only the first byte is timed). KVM-accelerated QEMU is not a useful peer on
# kvm_pvm hosts (SeaBIOS runs at emulated CPL0: seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-10}"

if ! command -v qemu-system-x86_64 >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >/dev/null
fi
cargo build --release -q -p hci-compute --example boot_time
BIN="${CARGO_TARGET_DIR:-target}/release/examples/boot_time"
HELLO=$("$BIN" build-guest hello)
SPIN=$("$BIN" build-guest spin)
BLK=$("$BIN" build-guest blk)
DISK=/dev/shm/hci-bench-vmm.img
trap 'rm -f "$DISK"' EXIT
dd if=/dev/zero of="$DISK" bs=1M count=64 status=none

python3 - "$BIN" "$HELLO" "$SPIN" "$RUNS" "$BLK" "$DISK" <<'PY'
import os, signal, statistics, subprocess, sys, time

binary, hello, spin, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
blk, disk = sys.argv[5], sys.argv[6]
READS = 20000
MEM_MIB = 64
qemu = ["qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-display", "none",
        "-serial", "stdio", "-no-reboot", "-m", str(MEM_MIB)]
peers = {
    "hci-vmm": lambda k: [binary, "run", k, "1", str(MEM_MIB)],
    "qemu-pc": lambda k: qemu + ["-M", "pc", "-kernel", k],
    "qemu-microvm": lambda k: qemu + ["-M", "microvm", "-kernel", k],
}

def boot(cmd, wait_exit):
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    p.stdout.read(1)
    first = time.monotonic() - t0
    if wait_exit:
        p.stdout.read()
        p.wait(timeout=30)
        done = time.monotonic() - t0
    else:
        p.stdout.readline()
        p.kill(); p.wait()
        done = None
    return first, done

def overhead(cmd):
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    p.stdout.readline()          # "spinning"
    time.sleep(0.3)
    total = guest = 0
    size = 0
    with open(f"/proc/{p.pid}/smaps") as f:
        for line in f:
            if line.startswith("Size:"):
                size = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
                total += rss
                # The guest-RAM mapping: MEM_MIB, maybe with a guard page or alignment slack.
                if MEM_MIB * 1024 <= size <= MEM_MIB * 1024 + 4096:
                    guest += rss
    p.send_signal(signal.SIGKILL); p.wait()
    return total, guest

def iops(cmd):
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    start = done = None
    for line in p.stdout:
        if line.startswith(b"reads start"):
            start = time.monotonic()
        elif line.startswith(b"reads done"):
            done = time.monotonic()
            break
    p.kill(); p.wait()
    return READS / (done - start) if start and done else float("nan")

blk_peers = {
    "hci-vmm": [binary, "run", "--disk", disk, blk, "1", str(MEM_MIB), f"reads={READS}"],
    "qemu-microvm": qemu + ["-M", "microvm", "-global", "virtio-mmio.force-legacy=false", "-kernel", blk,
                            "-drive", f"id=d0,file={disk},format=raw,if=none", "-device", "virtio-blk-device,drive=d0",
                            "-append", f"reads={READS}"],
}

res = {name: {"first": [], "exit": []} for name in peers}
for _ in range(runs):
    for name, mk in peers.items():
        first, done = boot(mk(hello), wait_exit=(name != "qemu-microvm"))
        res[name]["first"].append(first * 1000)
        if done is not None:
            res[name]["exit"].append(done * 1000)
mem = {}
for name, mk in peers.items():
    samples = [overhead(mk(spin)) for _ in range(3)]
    total, guest = sorted(samples)[1]
    mem[name] = (total, guest, total - guest)

io = {name: [] for name in blk_peers}
for _ in range(max(3, runs // 2)):
    for name, cmd in blk_peers.items():
        io[name].append(iops(cmd))

med = lambda v: statistics.median(v) if v else float("nan")
ours = res["hci-vmm"]
print(f"runs={runs}  guest: hello (PVH ELF, CPL3 serial + i8042 reset), {MEM_MIB} MiB, 1 vCPU\n")
print("| peer | first serial byte ms (median) | process exit ms (median) | RSS KiB | guest RAM RSS KiB | overhead KiB |")
print("|---|---|---|---|---|---|")
for name in peers:
    t, g, o = mem[name]
    print(f"| {name} | {med(res[name]['first']):.1f} | {med(res[name]['exit']):.1f} | {t} | {g} | {o} |")
print()
for name in ("qemu-pc", "qemu-microvm"):
    r = med(ours["first"]) / med(res[name]["first"])
    print(f"first byte: hci-vmm / {name} = {r:.3f}x  (goal <= 0.5x)")
r = med(ours["exit"]) / med(res["qemu-pc"]["exit"])
print(f"exit:       hci-vmm / qemu-pc = {r:.3f}x")
print(f"overhead:   hci-vmm {mem['hci-vmm'][2] / 1024:.2f} MiB (goal <= 5 MiB); qemu-pc {mem['qemu-pc'][2] / 1024:.2f} MiB")
print()
print(f"4k read IOPS, QD1, {READS} reads, RAM-backed file: "
      f"hci-vmm {med(io['hci-vmm']):.0f}, qemu-microvm {med(io['qemu-microvm']):.0f}, "
      f"ratio {med(io['hci-vmm']) / med(io['qemu-microvm']):.2f}x")
PY
