"""pyublk_fast.util: the helpers the package, tests, benchmarks share."""
from __future__ import annotations

import os
import threading
import time

import pytest

from pyublk_fast import util


@pytest.mark.parametrize("nbytes", [1, 512, 4096, 65536 + 512])
def test_aligned_array_is_page_aligned_and_exact(nbytes):
    arr = util.aligned_array(nbytes)
    assert arr.nbytes == nbytes and arr.dtype.itemsize == 1
    assert arr.__array_interface__["data"][0] % util.PAGE_SIZE == 0
    arr[:] = 7                                  # writable, all of it
    assert util.aligned_array(100, align=512).__array_interface__["data"][0] % 512 == 0


def test_wait_for_path_both_ways(tmp_path):
    path = str(tmp_path / "node")
    assert not util.wait_for_path(path, True, timeout=0.02)
    assert util.wait_for_path(path, False, timeout=0)
    timer = threading.Timer(0.05, lambda: open(path, "w").close())
    timer.start()
    assert util.wait_for_path(path, True, timeout=5)
    timer.join()
    threading.Timer(0.05, os.unlink, [path]).start()
    assert util.wait_for_path(path, False, timeout=5)


def test_wait_until_gives_up_after_the_timeout():
    t0 = time.monotonic()
    assert not util.wait_until(lambda: False, 0.05, 0.01)
    assert 0.05 <= time.monotonic() - t0 < 2
    assert util.wait_until(lambda: True, 0)


def test_kernel_release_is_uname():
    assert util.kernel_release() == os.uname().release


def test_kublk_path_prefers_KUBLK(tmp_path, monkeypatch):
    exe = tmp_path / "kublk"
    exe.write_text("#!/bin/sh\n")
    monkeypatch.setenv("KUBLK", str(exe))
    assert util.kublk_path() is None                  # not executable: not usable
    exe.chmod(0o755)
    assert util.kublk_path() == str(exe)
    monkeypatch.delenv("KUBLK")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    cache = tmp_path / "cache"
    monkeypatch.setenv("UBLK_VM_CACHE", str(cache))
    assert util.kublk_path() is None
    built = cache / "kublk" / util.kernel_release() / "kublk"
    built.parent.mkdir(parents=True)
    built.write_text("#!/bin/sh\n")
    built.chmod(0o755)
    assert util.kublk_path() == str(built)
