"""In-process networks (hci.Networks) in a network namespace of their own:
a bridge network with DHCP, a TAP port, idempotent ensure, removal, and
the errors bad input gets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

SCRIPT = r'''
import subprocess, sys
import hci

nets = hci.Networks(sys.argv[1])
net = hci.Network("pylan", {
    "kind": {"type": "bridge"},
    "cidr": "10.77.0.0/24",
    "gateway": "10.77.0.1",
    "dhcp": {"start": "10.77.0.100", "end": "10.77.0.150"},
})
info = nets.ensure(net.to_json())
assert info.name == "pylan" and info.dhcp_running, info
again = nets.ensure(net.to_json())
assert again.bridge == info.bridge, (info, again)
addrs = subprocess.run(["ip", "-o", "addr", "show", "dev", info.bridge],
                       capture_output=True, text=True, check=True).stdout
assert "inet 10.77.0." in addrs, addrs  # the host's address on the network
tap = nets.attach_port("pylan", "vm1-eth0", "52:54:00:12:34:56")
link = subprocess.run(["ip", "-o", "link", "show", "dev", tap],
                      capture_output=True, text=True, check=True).stdout
assert f"master {info.bridge}" in link, link
assert [n.name for n in nets.list()] == ["pylan"]
assert nets.list()[0].ports == ["vm1-eth0"], nets.list()
for bad in ("52:54:00:12:34", "zz:54:00:12:34:56"):
    try:
        nets.attach_port("pylan", "p2", bad)
    except hci.InvalidSpec:
        pass
    else:
        raise AssertionError(f"{bad} accepted")
try:
    nets.ensure(hci.Volume("v", {"size": "1Mi"}).to_json())
except hci.InvalidSpec:
    pass
else:
    raise AssertionError("a Volume was taken for a Network")
nets.detach_port("pylan", "vm1-eth0")
nets.remove("pylan")
assert nets.list() == []
gone = subprocess.run(["ip", "link", "show", "dev", info.bridge], capture_output=True)
assert gone.returncode != 0, "the bridge is still there"
print("networks OK")
'''


def test_networks_in_their_own_namespace(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    ns = f"hci-pynet-{uuid.uuid4().hex[:6]}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        r = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", SCRIPT, str(tmp_path / "net")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0 and "networks OK" in r.stdout, r.stdout + r.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
