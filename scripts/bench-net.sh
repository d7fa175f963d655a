#!/usr/bin/env bash
# hci-net benchmark, all in one run (needs root: namespaces, bridges, VXLAN):
#   - TCP throughput (iperf3, one stream) between two namespaces over a direct
#     veth pair (the ceiling), through an hci bridge network (veth ports) and
#     through an hci VXLAN overlay between two namespace "nodes"; medians of
#     ROUNDS interleaved rounds, ratios to the veth pair;
#   - DHCP leases per second: the server logic alone, and a burst of
#     DHCP_CLIENTS real busybox udhcpc clients against the running server.
#
#   scripts/bench-net.sh                  # ROUNDS=3 DHCP_CLIENTS=16
#   ROUNDS=5 DHCP_CLIENTS=32 scripts/bench-net.sh
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v iperf3 >/dev/null || need+=(iperf3)
command -v busybox >/dev/null || need+=(busybox-static)
command -v nft >/dev/null || need+=(nftables)
if ((${#need[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), kernel $(uname -r)"
ROUNDS="${ROUNDS:-3}" DHCP_CLIENTS="${DHCP_CLIENTS:-16}" \
    cargo bench -q -p hci-net --bench throughput
