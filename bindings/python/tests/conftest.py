"""Fixtures: a fresh volume store per test, and a real hci-daemon on a
temporary unix socket (inside its own network namespace when the host
allows, so networks it creates never touch the host's)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

import hci

REPO = Path(__file__).resolve().parents[3]


def _find_binary(name: str) -> Path | None:
    """$HCI_BIN_DIR/name, else the workspace's debug or release build."""
    dirs = []
    if os.environ.get("HCI_BIN_DIR"):
        dirs.append(Path(os.environ["HCI_BIN_DIR"]))
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    dirs += [target / "debug", target / "release"]
    for d in dirs:
        p = d / name
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


@pytest.fixture
def store(tmp_path: Path) -> hci.VolumeStore:
    """An empty local volume store in a temporary directory."""
    return hci.VolumeStore(tmp_path / "volumes")


class Daemon:
    """A running hci-daemon."""

    def __init__(self, socket: Path, data: Path, netns: str | None, log: Path) -> None:
        self.socket = socket
        self.data = data
        self.netns = netns
        self.log = log

    @property
    def server(self) -> str:
        """The URI clients connect to."""
        return f"unix://{self.socket}"

    def client(self) -> hci.Client:
        """A new client of this daemon."""
        return hci.Client(self.server)


def _make_netns() -> str | None:
    if shutil.which("ip") is None:
        return None
    name = f"hci-py-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True)
    if r.returncode != 0:
        return None
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], capture_output=True)
    return name


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """hci-daemon on a temporary socket, with a fresh data directory."""
    exe = _find_binary("hci-daemon")
    if exe is None:
        pytest.skip(
            "needs the hci-daemon binary: cargo build -p hci-daemon --bins "
            "(or set HCI_BIN_DIR); scripts/test-python.sh builds it"
        )
    base = tmp_path_factory.mktemp("daemon")
    socket = base / "hci.sock"
    log = base / "daemon.log"
    netns = _make_netns()
    cmd = [
        str(exe),
        "--data-dir",
        str(base / "data"),
        "--listen",
        f"unix:{socket}",
        "--node",
        "pytest",
    ]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns] + cmd
    env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"hci-daemon did not start:\n{log.read_text()}")
            time.sleep(0.05)
        yield Daemon(socket, base / "data", netns, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # VM and replica server processes outlive their daemon by design.
        _kill_processes_under(base)
        if netns is not None:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def _kill_processes_under(base: Path) -> None:
    """SIGKILLs the hci-vmm and replica server processes whose command
    line mentions `base`."""
    needle = str(base).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmd and (b"hci-vmm" in cmd or b"replica-server" in cmd):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def client(daemon: Daemon) -> hci.Client:
    """A client of the session's daemon."""
    return daemon.client()


def kvm_usable() -> bool:
    """True if /dev/kvm can be opened read-write."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True
