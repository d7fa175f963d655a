#!/usr/bin/env bash
# Backup benchmark (issue 8): hci-backup vs restic and borg (Debian), same run,
# same data: a 1 GiB image (50% random, 25% zeros, 25% repeated text), then 1%
# changed as 2,621 scattered aligned 4 KiB writes. Reports full backup time,
# incremental time, bytes the incremental added, restore time (verified), and
# ratios to restic. Usage: scripts/bench-backup.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-$(mktemp -d /tmp/bench-backup.XXXXXX)}
mkdir -p "$W"
# The peers come from Debian: install what is missing.
need=()
command -v restic >/dev/null || need+=(restic)
command -v borg >/dev/null || need+=(borgbackup)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v bc >/dev/null || need+=(bc)
if ((${#need[@]})); then
  echo "bench-backup: installing ${need[*]} (Debian packages)" >&2
  SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
for c in restic borg qemu-img bc; do
  command -v "$c" >/dev/null || { echo "bench-backup: $c is still missing after apt-get install" >&2; exit 2; }
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build -q --release -p hci-backup --bin hci-backup --example bench-apply
cargo build -q --release -p hci-storage --bin hci-storage
B=$CARGO_TARGET_DIR/release
HB=$B/hci-backup; HS=$B/hci-storage; APPLY=$B/examples/bench-apply

python3 - "$W" <<'PY'
import os, random, sys
w = sys.argv[1]; G = 1 << 30
r = random.Random(42)
with open(f"{w}/img", "wb") as f:
    f.write(os.urandom(G // 2))
    f.write(b"\0" * (G // 4))
    text = b"The quick brown fox jumps over the lazy dog; hci backup benchmark text.\n"
    f.write((text * (G // 4 // len(text) + 1))[: G // 4])
blocks = r.sample(range(G // 4096), 2621)
with open(f"{w}/offsets", "w") as f:
    for b in sorted(blocks):
        f.write(f"{b * 4096}\n")
PY
cp --sparse=always "$W/img" "$W/img2"
python3 - "$W" <<'PY'
import os, sys
w = sys.argv[1]
with open(f"{w}/img2", "r+b") as f:
    for line in open(f"{w}/offsets"):
        f.seek(int(line)); f.write(os.urandom(4096))
PY
CHANGED=$((2621 * 4096))

t() { local s=$(date +%s.%N); "$@" >/dev/null 2>&1 || { echo "bench-backup: failed: $*" >&2; exit 1; }; echo "$(date +%s.%N) - $s" | bc; }
du_b() { du -sb "$1" | cut -f1; }

# --- hci-backup
rm -rf "$W/vols" "$W/hb"; mkdir -p "$W/vols"
$HS import "$W/img" "$W/vols/disk" >/dev/null
$HS snapshot "$W/vols/disk" s1 >/dev/null
$HB init --target "file://$W/hb" >/dev/null
sync
h_full=$(t $HB backup --target "file://$W/hb" "$W/vols/disk@s1")
ID1=$($HB list --target "file://$W/hb" | awk '{print $1}')
$APPLY "$W/vols/disk" "$W/img2" "$W/offsets"
$HS snapshot "$W/vols/disk" s2 >/dev/null
s0=$(du_b "$W/hb"); sync
h_inc=$(t $HB backup --target "file://$W/hb" "$W/vols/disk@s2" --base "$ID1")
h_add=$(( $(du_b "$W/hb") - s0 ))
ID2=$($HB list --target "file://$W/hb" | tail -1 | awk '{print $1}')
h_rest=$(t $HB restore --target "file://$W/hb" "$ID2" "$W/vols/restored")
h_ok=$(cmp -s "$W/img2" "$W/vols/restored/"layer-*.img && echo identical || echo DIFFERENT)
rm -rf "$W/vols" "$W/hb"

# --- restic
export RESTIC_PASSWORD=bench
rm -rf "$W/restic" "$W/r-src" "$W/r-out"; mkdir -p "$W/r-src"
restic init -q -r "$W/restic"
cp --sparse=always "$W/img" "$W/r-src/disk.img"; sync
r_full=$(t restic -q -r "$W/restic" backup "$W/r-src")
cp --sparse=always "$W/img2" "$W/r-src/disk.img"; sync
s0=$(du_b "$W/restic")
r_inc=$(t restic -q -r "$W/restic" backup "$W/r-src")
r_add=$(( $(du_b "$W/restic") - s0 ))
r_rest=$(t restic -q -r "$W/restic" restore latest --target "$W/r-out")
rm -rf "$W/restic" "$W/r-out"

# --- borg (fixed 4 MiB chunks)
export BORG_PASSPHRASE=bench BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
rm -rf "$W/borg" "$W/b-out"; mkdir -p "$W/b-out"
borg init -e repokey "$W/borg" >/dev/null 2>&1
cp --sparse=always "$W/img" "$W/r-src/disk.img"; sync
b_full=$(t borg create --chunker-params fixed,4194304 "$W/borg::a1" "$W/r-src")
cp --sparse=always "$W/img2" "$W/r-src/disk.img"; sync
s0=$(du_b "$W/borg")
b_inc=$(t borg create --chunker-params fixed,4194304 "$W/borg::a2" "$W/r-src")
b_add=$(( $(du_b "$W/borg") - s0 ))
b_rest=$(cd "$W/b-out" && t borg extract "$W/borg::a2")
rm -rf "$W/borg" "$W/b-out" "$W/r-src"

printf '\nbackup benchmark, 1 GiB image, incremental = 2621 scattered 4 KiB writes (%d bytes)\n' "$CHANGED"
printf '%-12s %10s %10s %14s %10s\n' tool full_s incr_s incr_added_B restore_s
printf '%-12s %10.2f %10.2f %14d %10.2f  (restore %s)\n' hci-backup "$h_full" "$h_inc" "$h_add" "$h_rest" "$h_ok"
printf '%-12s %10.2f %10.2f %14d %10.2f\n' restic "$r_full" "$r_inc" "$r_add" "$r_rest"
printf '%-12s %10.2f %10.2f %14d %10.2f\n' borg-fixed4M "$b_full" "$b_inc" "$b_add" "$b_rest"
printf 'hci/restic ratios: full %.2f  incr %.2f  added %.3f  restore %.2f   added/changed %.2fx\n' \
  "$(echo "$h_full / $r_full" | bc -l)" "$(echo "$h_inc / $r_inc" | bc -l)" \
  "$(echo "$h_add / $r_add" | bc -l)" "$(echo "$h_rest / $r_rest" | bc -l)" \
  "$(echo "$h_add / $CHANGED" | bc -l)"
