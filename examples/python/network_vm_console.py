#!/usr/bin/env python3
"""Create a network and a VM on hci-daemon, wait until it runs, print its console.

    python3 examples/python/network_vm_console.py unix:///var/lib/hci/hci.sock

The VM boots hci's `net` test guest (built from source by the daemon): it
brings its NIC up on the management network and prints its MAC and IP on
the serial console. Everything is deleted at the end.
"""

from __future__ import annotations

import sys

import hci


def main(server: str) -> None:
    """Runs the example against the daemon at ``server``."""
    client = hci.Client(server)

    net = client.apply(
        hci.Network(
            "example-net",
            {
                "kind": {"type": "management"},
                "cidr": "10.96.0.0/24",
                "gateway": "10.96.0.1",
                "uplink": "lo",
            },
        )
    )
    print(f"created {net!r}")
    vm = client.apply(
        hci.VirtualMachine(
            "example-vm",
            {
                "cpus": 1,
                "memory": "64Mi",
                "boot": {"type": "kernel", "path": "guest:net", "cmdline": "ip=10.96.0.2"},
                "nics": [{"name": "eth0", "network": "example-net"}],
                "runStrategy": "Always",
            },
            labels={"app": "example"},
        )
    )
    print(f"created {vm!r}")
    try:
        vm = client.wait_for_phase("example-vm", "Running", timeout=120)
        print(f"running on node {vm.node}")
        with client.console("example-vm") as console:
            out = console.read_until("ip 10.96.0.2", timeout=60)
        print("console:")
        print(out.decode(errors="replace").rstrip())
    finally:
        client.delete(hci.VirtualMachine, "example-vm")
        client.wait_deleted(hci.VirtualMachine, "example-vm", timeout=60)
        client.delete(hci.Network, "example-net")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else hci.DEFAULT_SERVER)
