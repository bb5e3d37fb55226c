"""Bench scenarios: each returns a row dict (iops, MB/s, latency, reference, ratio)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

from ..backend import Backend
from ..device import Device


class PyNull(Backend):
    """A pure-Python null backend: the cost of one Python call per request."""

    def __init__(self, size):
        self.size = size

    def read(self, offset, buf):
        pass

    def write(self, offset, data):
        pass


def fio_iops(path: str, rw: str, bs: int, qd: int, runtime: float) -> float | None:
    """fio with io_uring, O_DIRECT, on the same file: the reference a loop server is held to."""
    if shutil.which("fio") is None:
        return None
    out = subprocess.run(
        ["fio", "--name=ref", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}",
         "--ioengine=io_uring", "--direct=1", f"--runtime={runtime}", "--time_based", "--numjobs=1",
         "--output-format=json", "--randrepeat=0"], capture_output=True, text=True, check=False)
    if out.returncode:
        return None
    job = json.loads(out.stdout)["jobs"][0]
    return job["read"]["iops"] + job["write"]["iops"]


def run_device(transport, backend, *, rw, bs, qd, runtime, native=True, depth=128) -> dict:
    with Device(backend, transport, depth=depth, native=native) as dev:
        return transport.run_load(dev.dev_id, rw=rw, bs=bs, qd=qd, runtime=runtime)


def scenarios(transport, runtime: float, workdir: str):
    """Yield (name, row) for each scenario."""
    from ..backends.loop import LoopBackend
    from ..backends.null import NullBackend
    from ..backends.qcow2 import Qcow2Image
    from ..backends.qcow2_backend import Qcow2Backend

    size = 256 << 20
    path = os.path.join(workdir, "loop.img")
    with open(path, "wb") as f:           # real data, so reads hit allocated blocks
        chunk = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(chunk)
    native_null = None
    for qd in (1, 32, 128):
        r = run_device(transport, NullBackend(1 << 30), rw="randread", bs=4096, qd=qd, runtime=runtime)
        if qd == 128:
            native_null = r["iops"]
        yield f"null native randread 4k qd{qd}", r, None, None
    r = run_device(transport, PyNull(1 << 30), rw="randread", bs=4096, qd=32, runtime=runtime, native=False)
    yield "null python randread 4k qd32", r, "null native qd128", native_null
    for rw in ("randread", "randwrite"):
        ref = fio_iops(path, rw, 4096, 32, runtime)
        r = run_device(transport, LoopBackend(path), rw=rw, bs=4096, qd=32, runtime=runtime)
        yield f"loop native {rw} 4k qd32", r, "fio io_uring direct", ref
    ref = fio_iops(path, "read", 131072, 32, runtime)
    r = run_device(transport, LoopBackend(path), rw="read", bs=131072, qd=32, runtime=runtime)
    yield "loop native read 128k qd32", r, "fio io_uring direct", ref
    loop_rr = None
    qpath = os.path.join(workdir, "img.qcow2")
    img = Qcow2Image.create(qpath, size)
    for off in range(0, size, 1 << 20):
        img.write(off, chunk)
    img.close()
    r = run_device(transport, LoopBackend(path), rw="randread", bs=4096, qd=16, runtime=runtime, native=False)
    loop_rr = r["iops"]
    yield "loop python randread 4k qd16", r, None, None
    r = run_device(transport, Qcow2Backend(qpath), rw="randread", bs=4096, qd=16, runtime=runtime)
    yield "qcow2 randread 4k qd16", r, "loop python qd16", loop_rr
