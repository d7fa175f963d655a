"""examples/python/*.py run as users run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, Daemon, kvm_usable

EXAMPLES = REPO / "examples" / "python"


def run(script: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, f"{script} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_volume_snapshot_backup_example(tmp_path: Path) -> None:
    out = run("volume_snapshot_backup.py", str(tmp_path))
    assert "restore OK" in out and "ok=True" in out


@pytest.mark.skipif(not kvm_usable(), reason="needs a usable /dev/kvm")
def test_network_vm_console_example(daemon: Daemon) -> None:
    if daemon.netns is None:
        pytest.skip("needs a network namespace for the daemon (ip netns add: CAP_NET_ADMIN)")
    out = run("network_vm_console.py", daemon.server)
    assert "running on node pytest" in out
    assert "ip 10.96.0.2" in out
