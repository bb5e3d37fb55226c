"""Shared fixtures: a simulated ublk driver, backing files and backend factories."""
from __future__ import annotations

import os

import pytest

from pyublk_fast.transport.sim import SimTransport

MiB = 1 << 20
DEV_SIZE = 4 * MiB


@pytest.fixture
def sim():
    """A fresh SimTransport (its own driver thread), closed after the test."""
    t = SimTransport()
    try:
        yield t
    finally:
        t.close()


@pytest.fixture
def backing_file(tmp_path):
    """A 4 MiB zero-filled raw file for the loop backend."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(DEV_SIZE)
    return str(path)


@pytest.fixture
def qcow2_file(tmp_path):
    """An empty 4 MiB qcow2 v3 image with 64 KiB clusters."""
    from pyublk_fast.backends.qcow2 import Qcow2Image
    path = str(tmp_path / "disk.qcow2")
    Qcow2Image.create(path, DEV_SIZE).close()
    return path


#: Backend kinds: name -> (stores data, Device(native=...)).
BACKEND_KINDS = {
    "memory": (True, True),
    "loop-native": (True, True),
    "loop-python": (True, False),
    "null-native": (False, True),
    "qcow2": (True, True),
}


@pytest.fixture
def make_backend(tmp_path):
    """make_backend(kind) -> (backend, native flag); kind is a key of BACKEND_KINDS.

    File-backed kinds reuse one file per test, so calling it twice reopens the same data.
    """
    def make(kind: str):
        from pyublk_fast.backends.loop import LoopBackend
        from pyublk_fast.backends.memory import MemoryBackend
        from pyublk_fast.backends.null import NullBackend
        from pyublk_fast.backends.qcow2 import Qcow2Image
        from pyublk_fast.backends.qcow2_backend import Qcow2Backend
        native = BACKEND_KINDS[kind][1]
        if kind == "memory":
            return MemoryBackend(DEV_SIZE), native
        if kind == "null-native":
            return NullBackend(DEV_SIZE), native
        if kind.startswith("loop"):
            path = tmp_path / "loop.img"
            if not path.exists():
                with open(path, "wb") as f:
                    f.truncate(DEV_SIZE)
            return LoopBackend(str(path)), native
        path = str(tmp_path / "img.qcow2")
        if not os.path.exists(path):
            Qcow2Image.create(path, DEV_SIZE).close()
        return Qcow2Backend(path), native
    return make
