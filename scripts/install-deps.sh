#!/usr/bin/env bash
# Installs what a fresh machine (Rust toolchain, Python 3.11, gcc, qemu-utils)
# lacks for hci's tests and benchmarks. Idempotent: skips what is present.
set -euo pipefail

# Debian packages: command that proves presence -> package.
declare -A PKGS=(
  [fio]=fio
  [nbdkit]=nbdkit
  [nbdinfo]=libnbd-bin
  [qemu-io]=qemu-utils
  [qemu-system-x86_64]=qemu-system-x86
  [nft]=nftables
  [busybox]=busybox-static
  [ping]=iputils-ping
  [iperf3]=iperf3
  [ip]=iproute2
  [etcd]=etcd-server
  [protoc]=protobuf-compiler
)

missing=()
for cmd in "${!PKGS[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${PKGS[$cmd]}")
done
# etcd-client's build script runs protoc on protos that import Google's
# well-known types (descriptor.proto, struct.proto).
[[ -f /usr/include/google/protobuf/descriptor.proto ]] || missing+=(libprotobuf-dev)

# Debian's cloud kernel: the QEMU backend's real-Linux test boots it (with
# modules from /lib/modules) under TCG.
compgen -G '/boot/vmlinuz-*-cloud-amd64' >/dev/null || missing+=(linux-image-cloud-amd64)

# OVMF (UEFI firmware): the QEMU backend's UEFI boot test (tests/qemu_uefi.rs)
# and `boot: {type: firmware, kind: uefi}` VMs.
[[ -f /usr/share/OVMF/OVMF_CODE_4M.fd ]] || missing+=(ovmf)

if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}" >&2
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Rust components used by the test command.
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest

# hci-backup's S3 tests: an S3-compatible server on 127.0.0.1 (s3s-fs or moto).
if ! command -v s3s-fs >/dev/null 2>&1 && ! command -v moto_server >/dev/null 2>&1; then
  python3 -m pip install --quiet 'moto[server]'
fi
