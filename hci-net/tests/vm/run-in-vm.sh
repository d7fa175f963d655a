#!/usr/bin/env bash
# Runs hci-net's lifecycle tests — by default the VLAN ones — inside a QEMU
# (TCG) VM booted with Debian's cloud kernel, which has
# CONFIG_BRIDGE_VLAN_FILTERING: the reference machines' kernel lacks it, so
# this is where the VLAN data path is exercised. Needs root, qemu-system-x86,
# busybox-static, iproute2; downloads the kernel package with apt-get.
#
#   hci-net/tests/vm/run-in-vm.sh                 # the two VLAN tests
#   hci-net/tests/vm/run-in-vm.sh --include-ignored --test-threads 1
#
# The VM has the nft command but no nf_tables modules: tests of management
# networks fail there with nft's error.
set -euo pipefail
cd "$(dirname "$0")/../../.."
if [ $# -eq 0 ]; then
    set -- --include-ignored --test-threads 1 vlan
fi
bin=$(cargo test -q -p hci-net --test lifecycle --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "lifecycle":
        print(m["executable"])')
[ -n "$bin" ] || { echo "could not build the lifecycle test binary" >&2; exit 1; }
# The kernel package and the initramfs are kept under the target directory.
work=${WORK:-${CARGO_TARGET_DIR:-target}/hci-net-vm}
deb_dir=$work/deb
mkdir -p "$deb_dir"
if [ ! -d "$deb_dir/root/boot" ]; then
    (cd "$deb_dir"
     pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image/ {print $2; exit}')
     apt-get download -q "$pkg" >/dev/null 2>&1
     dpkg-deb -x "$(ls "$deb_dir"/linux-image-[0-9]*.deb | head -1)" root)
fi
kver=$(ls "$deb_dir/root/lib/modules" | head -1)
kernel="$deb_dir/root/boot/vmlinuz-$kver"
rd=$work/initrd
rm -rf "$rd"; mkdir -p "$rd"/{bin,sbin,proc,sys,dev,run,tmp,lib/modules,etc}
cp /bin/busybox "$rd/bin/busybox"
for t in sh mount umount insmod poweroff sleep cat echo mkdir ln ping chmod; do ln -sf busybox "$rd/bin/$t"; done
copy_with_libs() {
    local f=$1 dst=$2
    cp "$f" "$rd$dst"
    ldd "$f" | awk '/=>/ {print $3} /ld-linux/ {print $1}' | while read -r lib; do
        [ -f "$lib" ] || continue
        mkdir -p "$rd$(dirname "$lib")"; cp -L "$lib" "$rd$lib"
    done
}
copy_with_libs /usr/sbin/ip /sbin/ip
copy_with_libs /usr/sbin/bridge /sbin/bridge
copy_with_libs /usr/sbin/nft /sbin/nft
copy_with_libs "$bin" /test
strip "$rd/test" 2>/dev/null || true
for m in net/llc/llc net/802/stp net/bridge/bridge drivers/net/veth drivers/net/tun; do
    cp "$deb_dir/root/lib/modules/$kver/kernel/$m.ko" "$rd/lib/modules/"
done
args=$(printf '%q ' "$@")
cat > "$rd/init" <<INIT
#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmp /run; mount -t tmpfs tmp /tmp
mkdir -p /dev/net
for m in llc stp bridge veth tun; do insmod /lib/modules/\$m.ko; done
ip link set lo up
echo "=== hci-net tests in a VM: kernel \$(cat /proc/sys/kernel/osrelease)"
cd /tmp && RUST_BACKTRACE=1 /test $args
echo "=== exit status \$?"
poweroff -f
INIT
chmod +x "$rd/init"
(cd "$rd" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$work/initrd.gz"
timeout "${TIMEOUT:-900}" qemu-system-x86_64 -accel tcg -m 2048 -smp 2 -nodefaults -display none \
    -serial stdio -no-reboot -kernel "$kernel" -initrd "$work/initrd.gz" \
    -append "console=ttyS0 rdinit=/init quiet panic=-1" | tee "$work/console.log"
# QEMU exits 0 whatever the tests did: the guest prints their status.
grep -q "=== exit status 0" "$work/console.log"
