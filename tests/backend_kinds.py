"""One way to build each shipped backend for tests, on the simulated driver and the kernel."""
from __future__ import annotations

from pathlib import Path


def build_backend(kind: str, directory: Path, size: int):
    """(backend, native) for kind: memory, null, loop, loop-python (loop served by Python
    handlers), qcow2. File-backed kinds reuse their file in `directory`, so a second call
    reopens the same data."""
    from pyublk_fast.backends.loop import LoopBackend
    from pyublk_fast.backends.memory import MemoryBackend
    from pyublk_fast.backends.null import NullBackend
    from pyublk_fast.backends.qcow2 import Qcow2Image
    from pyublk_fast.backends.qcow2_backend import Qcow2Backend
    if kind == "memory":
        return MemoryBackend(size), True
    if kind == "null":
        return NullBackend(size), True
    if kind in ("loop", "loop-python"):
        path = directory / "loop.img"
        if not path.exists():
            with open(path, "wb") as fh:
                fh.truncate(size)
        return LoopBackend(str(path)), kind == "loop"
    if kind == "qcow2":
        path = directory / "img.qcow2"
        if not path.exists():
            Qcow2Image.create(str(path), size).close()
        return Qcow2Backend(str(path)), True
    raise ValueError(f"unknown backend kind {kind!r}")
