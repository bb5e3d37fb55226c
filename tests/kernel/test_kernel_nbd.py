"""The nbd backend on the real driver, against servers in the guest: fio crc32c verify
on nbdkit's memory plugin (with structured replies, the default, and with simple ones), discard and write-zeroes reaching the server (and reading back
as zeros), ext4 on qemu-nbd serving a qcow2 image (the image holds what was written), the
CLI's `add -t nbd` / `list`, qemu-nbd killed and restarted under fio with --reconnect,
and a fake server's error replies reaching the application with the right errno."""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernel_fixtures import (cli_add, cli_env, cli_in_fork, fio, fio_result, fio_start,  # noqa: F401
                             ext4_with_files, files_digest, fio_verify_args, kt,
                             make_files, need_ext4, writes_completed)
from pyublk_fast.backends.nbd import NbdBackend
from pyublk_fast.device import Device

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_nbd import FakeServer, simple_reply  # noqa: E402  (the host tests' fake server)

MiB = 1 << 20
need_qemu = pytest.mark.skipif(shutil.which("qemu-nbd") is None or shutil.which("qemu-img") is None,
                               reason="qemu-utils missing: apt-get install qemu-utils")

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


@pytest.mark.parametrize("replies", ["structured", "simple"])
def test_nbd_fio_verify(kt, nbdkit, replies):
    backend = NbdBackend(nbdkit, structured_replies=replies == "structured")
    assert backend.structured == (replies == "structured")
    with Device(backend, kt, queues=2, depth=32) as dev:
        out = fio(*fio_verify_args(kt.block_path(dev.dev_id)))
        assert all(j["write"]["io_bytes"] > 0 and j["read"]["io_bytes"] > 0 for j in out["jobs"])
        assert dev.requests_served > 0


def test_nbd_discard_and_write_zeroes_reach_the_server(kt, tmp_path):
    """On two queues (two connections): BLKDISCARD and BLKZEROOUT over a written pattern
    read back as zeros where they fell and leave the rest, and the server counted TRIM and
    WRITE_ZEROES commands (nbdkit's stats filter), so neither was emulated with writes."""
    path, stats = tmp_path / "nbd.sock", tmp_path / "stats.txt"
    proc = serve(["nbdkit", "-f", "-U", str(path), "--filter=stats", "memory", "64M",
                  f"statsfile={stats}"], path)
    try:
        with Device(NbdBackend(f"nbd+unix:///?socket={path}"), kt, queues=2, depth=32) as dev:
            queue = f"/sys/block/ublkb{dev.dev_id}/queue"
            for limit in ("discard_max_bytes", "write_zeroes_max_bytes"):
                with open(f"{queue}/{limit}") as f:
                    assert int(f.read()) > 0, f"{limit}: the export's capability was not offered"
            want = bytearray(os.urandom(4 * MiB))
            with dev.open() as blk:
                blk.pwrite(bytes(want), 0)
                blk.flush()
                for off, n in ((0, MiB), (2 * MiB + 8192, 64 << 10)):
                    blk.discard(off, n)
                    want[off:off + n] = bytes(n)
                for off, n in ((MiB + 512, 3 * 512), (3 * MiB - 4096, 256 << 10)):
                    blk.write_zeroes(off, n)
                    want[off:off + n] = bytes(n)
                assert blk.pread(4 * MiB, 0) == want
    finally:
        stop(proc)
    counts = dict(re.findall(r"^(trim|zero): (\d+) ops", stats.read_text(), re.M))
    assert int(counts.get("trim", 0)) >= 2 and int(counts.get("zero", 0)) >= 2, stats.read_text()


def test_nbd_server_error_values_reach_the_application(kt, tmp_path):
    """The errno of an NBD error reply is what the application gets: a value NBD defines
    as itself, one it does not define as EINVAL (as the protocol asks of a client)."""
    # apart, so that the block layer cannot merge the writes into one request
    errs = {0: errno.ENOSPC, 64 << 10: errno.ENOENT, 128 << 10: 0x7fff1234}

    def on_request(conn, cmd, cookie, off, n, data):
        simple_reply(conn, cookie, err=errs.get(off, 0) if cmd == 1 else 0,
                     data=bytes(n) if cmd == 0 else b"")
        return True
    f = FakeServer(tmp_path, on_request=on_request)
    try:
        with Device(NbdBackend(f.uri), kt, depth=4) as dev, dev.open() as blk:
            got = blk.submit([(1, off, 4096, bytes(4096)) for off in errs])
    finally:
        f.close()
    assert got == [-errno.ENOSPC, -errno.EINVAL, -errno.EINVAL]


@need_qemu
def test_nbd_ext4_on_qemu_nbd_qcow2(kt, tmp_path):
    """ext4 made and filled through our device on qemu-nbd serving a qcow2 image: the
    device read whole afterwards is the image's content (qemu-img compare, after qemu-nbd
    closed it), a clean ext4 (fsck) whose files are the ones copied in (debugfs rdump)."""
    need_ext4("fsck.ext4", "debugfs")
    image, copy = tmp_path / "disk.qcow2", tmp_path / "copy.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "32M"], check=True)
    want = make_files(tmp_path / "src", 12, 61_000)
    sock, mnt = tmp_path / "qemu.sock", tmp_path / "mnt"
    mnt.mkdir()
    proc = serve(["qemu-nbd", "-f", "qcow2", "-t", "-x", "disk", "-k", str(sock), str(image)], sock)
    try:
        with Device(NbdBackend(f"nbd+unix:///disk?socket={sock}"), kt, depth=32) as dev:
            ext4_with_files(kt.block_path(dev.dev_id), tmp_path / "src", mnt)
            with dev.open() as blk:
                copy.write_bytes(blk.pread(32 * MiB, 0))
    finally:
        stop(proc)
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(copy), str(image)],
                         capture_output=True, text=True, timeout=120)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    fsck = subprocess.run(["fsck.ext4", "-n", "-f", str(copy)], capture_output=True, text=True,
                          timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump /data {out}", str(copy)], check=True,
                   capture_output=True, timeout=120)
    assert files_digest(str(out / "data")) == want


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


@need_qemu
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
