"""Small helpers the package, its tests, benchmarks and tools share (one definition each).

Page-aligned buffers, waiting for a device node, the running kernel's release and the
kernel selftests' reference server kublk.
"""
from __future__ import annotations

import mmap
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

PAGE_SIZE = mmap.PAGESIZE
#: Where tools/vm caches kernels and kublk builds unless UBLK_VM_CACHE says otherwise.
VM_CACHE = "/var/cache/pyublk-vm"


def aligned_array(nbytes: int, align: int = PAGE_SIZE) -> np.ndarray:
    """An uninitialised uint8 array of ``nbytes`` whose data starts on an ``align``
    boundary (O_DIRECT and the request buffers of a block device want page-aligned memory)."""
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.__array_interface__["data"][0]) % align
    return raw[start:start + nbytes]


def wait_until(ready: Callable[[], bool], timeout: float, interval: float = 0.005) -> bool:
    """Call ``ready()`` every ``interval`` seconds until it is true (True) or ``timeout``
    seconds have passed (False; ``ready()`` is asked once more at the end)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            return bool(ready())
        time.sleep(interval)
    return True


def wait_for_path(path: str, present: bool = True, timeout: float = 3.0,
                  interval: float = 0.005) -> bool:
    """Wait until ``path`` exists (``present``) or is gone; True when it happened in time.
    Device nodes appear and vanish shortly after the command that makes them (udev, devtmpfs)."""
    return wait_until(lambda: os.path.exists(path) == present, timeout, interval)


def kernel_release() -> str:
    """The running kernel's release (``uname -r``)."""
    return os.uname().release


def kublk_path() -> str | None:
    """The kernel selftests' reference server kublk, if present: ``$KUBLK`` (only that,
    when set), else ``kublk`` on PATH, else what tools/vm/build-kublk cached for the
    running kernel (``<UBLK_VM_CACHE>/kublk/<release>/kublk``), else, on the host that
    starts the VM, the one built last (``.../kublk/current/kublk``, the VM's kernel)."""
    env = os.environ.get("KUBLK")
    if env:
        return env if os.access(env, os.X_OK) else None
    found = shutil.which("kublk")
    if found:
        return found
    cache = Path(os.environ.get("UBLK_VM_CACHE") or VM_CACHE) / "kublk"
    for cand in (cache / kernel_release() / "kublk", cache / "current" / "kublk"):
        if os.access(cand, os.X_OK):
            return str(cand)
    return None
