"""Helpers shared by the kernel tests (imported by conftest.py and the tests)."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path


def kernel_series() -> tuple[int, int]:
    """(major, minor) of the running kernel, from uname -r."""
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    assert m, os.uname().release
    return int(m.group(1)), int(m.group(2))


def wait_for_path(path: str, present: bool, timeout: float = 3.0) -> bool:
    """Poll until ``path`` exists (or is gone); True when it happened in time."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.path.exists(path) == present:
            return True
        time.sleep(0.02)
    return os.path.exists(path) == present


def kublk_path() -> str | None:
    """The kublk binary built by tools/vm/build-kublk for the running kernel, if any."""
    env = os.environ.get("KUBLK")
    if env:
        return env if os.access(env, os.X_OK) else None
    cache = Path(os.environ.get("UBLK_VM_CACHE") or "/var/cache/pyublk-vm")
    cand = cache / "kublk" / os.uname().release / "kublk"
    return str(cand) if os.access(cand, os.X_OK) else None
