"""The nbd backend on the real driver, against servers in the guest: fio crc32c verify
on nbdkit's memory plugin, the CLI's `add -t nbd` / `list`, and qemu-nbd killed and
restarted under fio with --reconnect."""
from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import time

import pytest

from kernel_fixtures import (cli_add, cli_env, cli_in_fork, fio, fio_result, fio_start,  # noqa: F401
                             fio_verify_args, kt, writes_completed)
from pyublk_fast.backends.nbd import NbdBackend
from pyublk_fast.device import Device

pytestmark = pytest.mark.skipif(shutil.which("nbdkit") is None,
                                reason="nbdkit not installed (the VM lane's host packages bring it)")


def serve(argv: list[str], path) -> subprocess.Popen:
    """A server listening on the Unix socket path once this returns."""
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(path))
                return proc
            except OSError:
                assert time.monotonic() < deadline, f"{argv[0]} not listening after 30 s"
                time.sleep(0.05)


def stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    proc.send_signal(sig)
    proc.wait(30)
    proc.stderr.close()


@pytest.fixture
def nbdkit(tmp_path):
    """nbdkit's memory plugin (64 MiB) on a Unix socket: its nbd+unix URI."""
    path = tmp_path / "nbd.sock"
    proc = serve(["nbdkit", "-f", "-U", str(path), "memory", "64M"], path)
    yield f"nbd+unix:///?socket={path}"
    stop(proc)


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


@pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd missing: apt-get install qemu-utils")
def test_nbd_qemu_nbd_restarted_under_fio(kt, tmp_path, caplog):
    """qemu-nbd on a raw image (what it acknowledged is in the file) is killed while fio
    writes and verifies, and started again on the same socket: with --reconnect fio sees
    no error and its crc32c verify passes."""
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    path = tmp_path / "qemu.sock"
    argv = ["qemu-nbd", "-f", "raw", "-t", "-x", "disk", "-k", str(path), str(image)]
    proc = serve(argv, path)
    caplog.set_level(logging.WARNING, "pyublk_fast.nbd")
    try:
        backend = NbdBackend(f"nbd+unix:///disk?socket={path}", timeout=20, reconnect=True)
        with Device(backend, kt, depth=32) as dev:
            job = fio_start(*fio_verify_args(kt.block_path(dev.dev_id), size=24 << 20))
            deadline = time.monotonic() + 60
            while writes_completed(dev.dev_id) < 500:
                assert time.monotonic() < deadline and job.poll() is None, "fio made no progress"
                time.sleep(0.05)
            stop(proc, signal.SIGKILL)
            path.unlink()
            proc = serve(argv, path)
            out = fio_result(job)
            assert all(j["write"]["io_bytes"] > 0 and j["read"]["io_bytes"] > 0 for j in out["jobs"])
    finally:
        stop(proc)
    lines = [r.getMessage() for r in caplog.records if r.name == "pyublk_fast.nbd"]
    assert any("reconnected; sending" in ln for ln in lines), lines
