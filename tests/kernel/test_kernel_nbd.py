"""The nbd backend on the real driver, against nbdkit's memory plugin in the guest:
fio crc32c verify through /dev/ublkbN, and the CLI's `add -t nbd` / `list`."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

from kernel_fixtures import cli_add, cli_env, cli_in_fork, fio, fio_verify_args, kt  # noqa: F401
from pyublk_fast.backends.nbd import NbdBackend
from pyublk_fast.device import Device

pytestmark = pytest.mark.skipif(shutil.which("nbdkit") is None,
                                reason="nbdkit not installed (the VM lane's host packages bring it)")


@pytest.fixture
def nbdkit(tmp_path):
    """nbdkit's memory plugin (64 MiB) on a Unix socket: its nbd+unix URI."""
    path = tmp_path / "nbd.sock"
    proc = subprocess.Popen(["nbdkit", "-f", "-U", str(path), "memory", "64M"],
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(path))
                    break
                except OSError:
                    assert time.monotonic() < deadline, "nbdkit not listening after 30 s"
                    time.sleep(0.05)
        yield f"nbd+unix:///?socket={path}"
    finally:
        proc.terminate()
        proc.wait(30)
        proc.stderr.close()


def test_nbd_fio_verify(kt, nbdkit):
    with Device(NbdBackend(nbdkit), kt, queues=2, depth=32) as dev:
        out = fio(*fio_verify_args(kt.block_path(dev.dev_id)))
        assert all(j["write"]["io_bytes"] > 0 and j["read"]["io_bytes"] > 0 for j in out["jobs"])
        assert dev.requests_served > 0


def test_nbd_cli_add_and_list(kt, nbdkit, cli_env):
    dev_id, path = cli_add(cli_env, "-t", "nbd", "--uri", nbdkit)
    with open(path, "r+b", buffering=0) as f:
        f.write(b"\x3c" * 4096)
        f.seek(0)
        assert f.read(4096) == b"\x3c" * 4096
    res = cli_in_fork(cli_env, "list")
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith(f"dev {dev_id}:"))
    assert "target nbd" in line and f"uri={nbdkit}" in line, res.stdout
    assert cli_in_fork(cli_env, "del", "-n", str(dev_id)).returncode == 0
