"""What the qcow2 tests share: qemu-img as a peer, and a record of the engine's writes
and fsyncs, taken through its file I/O seam (``fileio.pwrite_all``, ``fileio.sync``)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
needs_qemu = pytest.mark.skipif(not (QEMU_IMG and QEMU_IO),
                                reason="qemu-img/qemu-io not installed (apt install qemu-utils)")
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def qemu_img(*args: str) -> str:
    r = subprocess.run([QEMU_IMG, *args], capture_output=True, text=True)
    assert r.returncode == 0, f"qemu-img {' '.join(args)} failed: {r.stdout}{r.stderr}"
    return r.stdout


def qemu_check(path: str, where: str = "") -> dict:
    """qemu-img check's findings; a corruption or a check error fails the test, leaked
    clusters (``leaks``) are for the caller to judge."""
    r = subprocess.run([QEMU_IMG, "check", "--output=json", path], capture_output=True,
                       text=True)
    assert r.stdout, f"{where}: qemu-img check failed: {r.stderr}"
    info = json.loads(r.stdout)
    for key in ("corruptions", "check-errors"):
        assert info.get(key, 0) == 0, f"{where}: {info}"
    return info


def assert_check_clean(path: str, where: str = "") -> None:
    """qemu-img check: no errors and no leaked clusters. Without qemu-img the test
    skips here, after its own checks, rather than pass without this one."""
    if QEMU_IMG is None:
        pytest.skip("qemu-img not installed (apt install qemu-utils; tools/dev.sh does): "
                    "the image was not checked by qemu-img")
    info = qemu_check(path, where)
    assert info.get("leaks", 0) == 0, f"{where}: {info}"


def record_io(monkeypatch) -> tuple[list, list]:
    """Log every (offset, bytes) the engine pwrites, in order, and still perform it;
    also note, at each fsync, how many writes it made durable. Returns (writes, syncs)."""
    from pyublk_fast.backends.qcow2 import fileio
    log: list = []
    syncs: list = []
    pwrite, sync = fileio.pwrite_all, fileio.sync

    def recording(fd, data, offset):
        log.append((offset, bytes(memoryview(data).cast("B"))))
        pwrite(fd, data, offset)

    def noting(fd):
        sync(fd)
        syncs.append(len(log))

    monkeypatch.setattr(fileio, "pwrite_all", recording)
    monkeypatch.setattr(fileio, "sync", noting)
    return log, syncs
