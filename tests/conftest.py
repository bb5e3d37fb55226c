"""Shared fixtures: a simulated ublk driver, backing files and backend factories."""
from __future__ import annotations


import pytest

from backend_kinds import build_backend

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
        backend, native = build_backend(kind.removesuffix("-native"), tmp_path, DEV_SIZE)
        assert native == BACKEND_KINDS[kind][1]
        return backend, native
    return make
