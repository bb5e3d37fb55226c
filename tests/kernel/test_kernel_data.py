"""Every backend serving a real /dev/ublkbN: fio crc32c verify, data paths agree, ext4 on top."""
from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from kernel_fixtures import (DEV_SIZE, MiB, ext4_with_files, files_digest, fio, fio_verify_args,  # noqa: F401
                             kt, make_backend, make_files, need_ext4)
from pyublk_fast import uapi
from pyublk_fast.device import Device
from pyublk_fast.util import kernel_release

STORING = [("memory", "copy"), ("memory", "user_copy"), ("loop", "copy"), ("loop", "user_copy"),
           ("loop", "zero_copy"), ("loop", "need_get_data"), ("loop-python", "copy"),
           ("qcow2", "copy"), ("qcow2", "user_copy"), ("qcow2", "zero_copy")]


def _skip_unless_kernel_has(kt, data_path: str) -> None:
    need = {"user_copy": uapi.UBLK_F_USER_COPY,
            "zero_copy": uapi.UBLK_F_SUPPORT_ZERO_COPY | uapi.UBLK_F_AUTO_BUF_REG}.get(data_path, 0)
    if need & ~kt.features():
        pytest.skip(f"kernel {kernel_release()} lacks {uapi.feature_names(need & ~kt.features())}")


@pytest.mark.parametrize("kind,data_path", STORING, ids=[f"{k}-{p}" for k, p in STORING])
def test_fio_verify(kt, tmp_path, kind, data_path):
    _skip_unless_kernel_has(kt, data_path)
    backend, native = make_backend(kind, tmp_path)
    with Device(backend, kt, queues=2, depth=32, data_path=data_path, native=native) as dev:
        out = fio(*fio_verify_args(kt.block_path(dev.dev_id)))
        assert all(j["write"]["io_bytes"] > 0 and j["read"]["io_bytes"] > 0 for j in out["jobs"])
        assert dev.requests_served > 0


@pytest.mark.parametrize("data_path", ["copy", "user_copy", "zero_copy"])
def test_null_serves_fio(kt, tmp_path, data_path):
    _skip_unless_kernel_has(kt, data_path)
    backend, native = make_backend("null", tmp_path, 1 << 30)
    with Device(backend, kt, depth=64, data_path=data_path, native=native) as dev:
        out = fio("--name=null", f"--filename={kt.block_path(dev.dev_id)}", "--rw=randrw",
                  "--bs=64k", "--iodepth=32", "--ioengine=io_uring", "--direct=1", "--size=64M")
        job = out["jobs"][0]
        assert job["read"]["io_bytes"] + job["write"]["io_bytes"] == 64 * MiB


def test_data_paths_give_the_same_bytes(kt, tmp_path):
    """Each data path writes its own region of one loop file and reads the whole file back."""
    from pyublk_fast.backends.loop import LoopBackend
    img = tmp_path / "same.img"
    ref = bytearray(os.urandom(DEV_SIZE))
    img.write_bytes(ref)
    paths = ["copy", "need_get_data"] + [p for p in ("user_copy", "zero_copy")
                                         if not ({"user_copy": uapi.UBLK_F_USER_COPY,
                                                  "zero_copy": uapi.UBLK_F_AUTO_BUF_REG}[p]
                                                 & ~kt.features())]
    for i, path in enumerate(paths):
        with Device(LoopBackend(str(img)), kt, depth=16, data_path=path) as dev, dev.open() as blk:
            assert hashlib.sha256(blk.pread(DEV_SIZE, 0)).digest() == hashlib.sha256(ref).digest(), path
            chunk = os.urandom(MiB + 128 * 1024)
            off = i * 2 * MiB
            blk.pwrite(chunk, off)
            ref[off:off + len(chunk)] = chunk
            assert blk.pread(len(chunk), off) == chunk, path
            blk.flush()
    assert img.read_bytes() == bytes(ref)


def test_flush_discard_write_zeroes(kt, tmp_path):
    backend, native = make_backend("loop", tmp_path)
    with Device(backend, kt) as dev, dev.open() as blk:
        blk.pwrite(b"\xa5" * (3 * MiB), 0)
        blk.discard(0, MiB)
        blk.write_zeroes(MiB, MiB)
        blk.flush()
        data = blk.pread(3 * MiB, 0)
        assert data[:2 * MiB] == bytes(2 * MiB) and data[2 * MiB:] == b"\xa5" * MiB


@pytest.mark.parametrize("kind,data_path", [("loop", "copy"), ("loop", "zero_copy"), ("qcow2", "copy")])
def test_ext4_mount_copy_remount(kt, tmp_path, kind, data_path):
    _skip_unless_kernel_has(kt, data_path)
    need_ext4()
    backend, native = make_backend(kind, tmp_path, 64 * MiB)
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    want = make_files(src, 20, 37_000)
    mnt.mkdir()
    with Device(backend, kt, queues=2, depth=32, data_path=data_path, native=native) as dev:
        bdev = kt.block_path(dev.dev_id)
        ext4_with_files(bdev, src, mnt)
        subprocess.run(["mount", "-o", "ro", bdev, str(mnt)], check=True, capture_output=True,
                       timeout=60)
        try:
            assert files_digest(str(mnt / "data")) == want
        finally:
            subprocess.run(["umount", str(mnt)], check=True, capture_output=True, timeout=60)
        fsck = subprocess.run(["fsck.ext4", "-n", "-f", bdev], capture_output=True, text=True,
                              timeout=120)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
