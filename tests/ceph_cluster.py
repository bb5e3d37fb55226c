"""A throwaway Ceph cluster for the rbd tests (tools/ceph/start-cluster): the session's
one is started once by the `ceph` fixture; fault tests start their own."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools" / "ceph"


def missing() -> str | None:
    """Why the rbd tests cannot run here, or None."""
    for tool in ("ceph-mon", "ceph-osd", "ceph", "rbd"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (tools/dev.sh installs ceph-mon ceph-osd)"
    try:
        from pyublk_fast.backends import _native_rbd  # noqa: F401
    except ImportError:
        return "the rbd extension was not built (apt-get install librbd-dev librados-dev, rebuild)"
    return None


class Cluster:
    """One running cluster: its directory, ceph.conf and a pool named `pool`; with cephx,
    client.admin's keyring is the one ceph.conf names."""

    def __init__(self, pool: str = "rbd", cephx: bool = False, timeout_scale: int = 1):
        """timeout_scale multiplies every time limit (an emulated machine is slow)."""
        self.dir = tempfile.mkdtemp(prefix="pyublk-ceph-")
        self.pool = pool
        self.timeout_scale = timeout_scale
        run = subprocess.run([TOOLS / "start-cluster", self.dir, pool], capture_output=True,
                             text=True, timeout=180 * timeout_scale,
                             env=dict(os.environ, CEPHX=str(int(cephx)),
                                      TIMEOUT_SCALE=str(timeout_scale)))
        if run.returncode:
            raise RuntimeError(f"start-cluster failed: {run.stderr.strip()}")
        self.conf = run.stdout.strip().splitlines()[-1]
        self._n = 0

    def env(self) -> dict:
        return dict(os.environ, CEPH_CONF=self.conf)

    def cli(self, *args: str, tool: str = "rbd") -> str:
        """Run `rbd ARGS` (or another Ceph tool) against this cluster; its stdout."""
        run = subprocess.run([tool, *args], capture_output=True, text=True,
                             timeout=60 * self.timeout_scale, env=self.env())
        if run.returncode:
            raise RuntimeError(f"{tool} {' '.join(args)}: {run.stderr.strip()}")
        return run.stdout

    def new_image(self, size: int) -> str:
        """A fresh image of size bytes (whole MiB): its POOL/IMAGE."""
        self._n += 1
        spec = f"{self.pool}/img{self._n}"
        self.cli("create", "--size", f"{size >> 20}M", spec)
        return spec

    def add_client(self, name: str, *caps: str) -> str:
        """A new cephx client.NAME with these capabilities: its keyring's path."""
        keyring = os.path.join(self.dir, f"{name}.keyring")
        self.cli("auth", "get-or-create", f"client.{name}", *caps, "-o", keyring, tool="ceph")
        return keyring

    def lock_holder(self, spec: str) -> tuple[str, str]:
        """(client.GID, address) of the image's one lock holder, as the cluster lists it."""
        lockers = json.loads(self.cli("lock", "ls", "--format", "json", spec))
        assert len(lockers) == 1, lockers
        return lockers[0]["locker"], lockers[0]["address"]

    def blocklist(self) -> str:
        """`ceph osd blocklist ls`: the blocklisted client addresses, one a line."""
        return self.cli("osd", "blocklist", "ls", tool="ceph")

    def kill_osd(self):
        subprocess.run([TOOLS / "stop-cluster", self.dir, "--osd"], check=True, timeout=60)

    def stop(self):
        subprocess.run([TOOLS / "stop-cluster", self.dir], check=True, timeout=60)


#: [cluster, users]: pytest makes one `ceph` fixture per test module that imports it;
#: they share this one cluster, stopped when the last of them is torn down.
_SHARED: list = []


@pytest.fixture(scope="session")
def ceph():
    """The session's cluster (started on first use, stopped at the end)."""
    why = missing()
    if why:
        pytest.skip(why)
    if not _SHARED:
        _SHARED[:] = [Cluster(cephx=True), 0]
    _SHARED[1] += 1
    try:
        yield _SHARED[0]
    finally:
        _SHARED[1] -= 1
        if not _SHARED[1]:
            cluster = _SHARED[0]
            _SHARED.clear()
            cluster.stop()
