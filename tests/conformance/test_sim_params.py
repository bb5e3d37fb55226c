"""Request limits (SET_PARAMS' DMA_ALIGN and SEGMENT parts): what the driver refuses,
what the block queue shows, and that requests reaching the server respect them.

Written against the ``transport`` fixture: here the simulated driver;
tests/kernel/test_kernel_conformance.py runs the same functions on a real ublk driver.
"""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from pyublk_fast import uapi
from pyublk_fast.backends.memory import MemoryBackend
from pyublk_fast.device import Device
from pyublk_fast.transport.base import RequestLimits

KiB, MiB = 1 << 10, 1 << 20
U64_MAX = (1 << 64) - 1

#: SET_PARAMS the driver refuses with EINVAL (the kernel's parameter check), and why.
REFUSED = [
    (RequestLimits(dma_alignment=4096), "alignment mask not below the page size"),
    (RequestLimits(dma_alignment=5), "alignment mask + 1 not a power of two"),
    (RequestLimits(seg_boundary_mask=2047), "boundary below the minimum segment size"),
    (RequestLimits(seg_boundary_mask=4094), "boundary mask + 1 not a power of two"),
    (RequestLimits(seg_boundary_mask=U64_MAX), "boundary mask + 1 wraps to 0"),
    (RequestLimits(max_segment_size=4095), "segment size below the minimum"),
    (RequestLimits(max_segment_size=0), "segment size 0"),
]
#: ... and some it takes, at the edges of the same rules.
ACCEPTED = [
    RequestLimits(dma_alignment=0),
    RequestLimits(dma_alignment=4095),
    RequestLimits(seg_boundary_mask=4095, max_segment_size=4096, max_segments=1),
    RequestLimits(seg_boundary_mask=(1 << 63) - 1, max_segment_size=0xFFFFFFFF, max_segments=0),
]


@pytest.fixture
def transport(sim):
    """The driver under test: the simulated one (the kernel suite overrides this fixture)."""
    return sim


def _bare_device(t) -> int:
    dev_id, _ = t.add_dev(-1, 1, 8, 64 * KiB, 0)
    return dev_id


def _drop(t, dev_id: int) -> None:
    t.release(dev_id)
    t.del_dev(dev_id)


def test_request_limits_refused_as_the_kernel_does(transport):
    """Each refused SET_PARAMS is EINVAL and leaves the device without parameters, so
    START_DEV fails too; the accepted ones pass."""
    t = transport
    dev_id = _bare_device(t)
    try:
        for limits, why in REFUSED:
            t.set_params(dev_id, MiB, 512)                      # valid parameters first
            with pytest.raises(OSError) as e:
                t.set_params(dev_id, MiB, 512, limits=limits)
            assert e.value.errno == errno.EINVAL, (why, limits, e.value)
            with pytest.raises(OSError) as e:                   # the refusal dropped them all
                t.start_dev(dev_id, timeout=5)
            assert e.value.errno == errno.EINVAL, (why, limits, e.value)
        for limits in ACCEPTED:
            t.set_params(dev_id, MiB, 512, limits=limits)
    finally:
        _drop(t, dev_id)


class _Recording(MemoryBackend):
    """A RAM disk that remembers the largest request it served."""

    def __init__(self, size: int):
        super().__init__(size)
        self.largest = 0

    def read(self, offset, buf):
        self.largest = max(self.largest, len(buf))
        return super().read(offset, buf)

    def write(self, offset, data):
        self.largest = max(self.largest, len(data))
        return super().write(offset, data)


class _Raw(_Recording):
    """Declares limits in the driver's own terms, zeros included."""

    raw: RequestLimits = RequestLimits()

    def request_limits(self):
        return self.raw


def test_declared_limits_reach_the_block_queue(transport):
    """What a backend declares is what the block queue has (/sys/block/ublkbN/queue/ on a
    kernel): kublk's null values, the driver's defaults without any, and the block layer's
    own for zeros."""
    t = transport
    kublk_like = _Recording(4 * MiB)
    kublk_like.dma_alignment, kublk_like.max_segments, kublk_like.max_segment_size = 4096, 32, 32 * KiB
    zeros = _Raw(4 * MiB)
    zeros.raw = RequestLimits(dma_alignment=0, max_segments=0)
    cases = [(kublk_like, dict(dma_alignment=4095, max_segments=32, max_segment_size=32768)),
             (_Recording(4 * MiB), dict(dma_alignment=3, max_segments=65535, max_segment_size=0xFFFFFFFF)),
             (zeros, dict(dma_alignment=511, max_segments=128, max_segment_size=0xFFFFFFFF))]
    for backend, want in cases:
        with Device(backend, t, depth=8) as dev:
            assert t.queue_limits(dev.dev_id) == want, type(backend).__name__
            data = os.urandom(256 * KiB)
            with dev.open() as blk:
                blk.pwrite(data, 64 * KiB)
                assert blk.pread(len(data), 64 * KiB) == data


def test_requests_respect_max_segments(transport):
    """With at most 4 segments of at most a page each, no request the server gets carries
    more than 16 KiB, though the user writes 256 KiB at once; the data comes back whole."""
    t = transport
    backend = _Recording(4 * MiB)
    backend.max_segments, backend.max_segment_size = 4, 4096
    with Device(backend, t, depth=8) as dev:
        data = os.urandom(256 * KiB)
        with dev.open() as blk:
            blk.pwrite(data, MiB)
            assert blk.pread(len(data), MiB) == data
        assert backend.largest == 16 * KiB
        assert bytes(backend.data[MiB:MiB + len(data)]) == data


@pytest.mark.parametrize("attr, value, message", [
    ("dma_alignment", 1, "from 2 to 4096"),
    ("dma_alignment", 768, "power of two"),
    ("dma_alignment", 8192, "from 2 to 4096"),
    ("max_segments", 1 << 16, "1..65535"),
    ("max_segment_size", 2048, "at least 4096"),
    ("segment_boundary", 2048, "at least 4096"),
    ("segment_boundary", 6144, "power of two"),
])
def test_bad_declared_limits_are_refused_up_front(sim, attr, value, message):
    backend = MemoryBackend(MiB)
    setattr(backend, attr, value)
    with pytest.raises(ValueError, match=f"MemoryBackend.{attr}={value}: .*{message}"):
        Device(backend, sim)


def test_declared_limits_in_the_drivers_terms():
    """Bytes become masks; a SEGMENT field left 0 takes the queue's value without the part."""
    backend = MemoryBackend(MiB)
    assert backend.request_limits() is None
    backend.dma_alignment, backend.max_segments = 512, 8
    limits = backend.request_limits()
    assert limits == RequestLimits(dma_alignment=511, max_segments=8)
    assert limits.segment() == (0xFFFFFFFF, 0xFFFFFFFF, 8)
    backend.dma_alignment, backend.segment_boundary = 0, 1 << 20
    assert backend.request_limits().types == uapi.UBLK_PARAM_TYPE_SEGMENT
    assert backend.request_limits().segment() == ((1 << 20) - 1, 0xFFFFFFFF, 8)


def test_limits_encode_into_the_params_struct():
    """The kernel transport's SET_PARAMS buffer: the parts at the header's offsets, their bits set."""
    p = np.zeros(1, uapi.PARAMS_DTYPE)
    p["types"] = uapi.UBLK_PARAM_TYPE_BASIC
    RequestLimits(dma_alignment=4095, max_segment_size=32 * KiB, max_segments=32).encode(p)
    raw = p.tobytes()
    assert int.from_bytes(raw[4:8], "little") == (uapi.UBLK_PARAM_TYPE_BASIC | uapi.UBLK_PARAM_TYPE_DMA_ALIGN
                                                  | uapi.UBLK_PARAM_TYPE_SEGMENT)
    assert int.from_bytes(raw[108:112], "little") == 4095
    assert int.from_bytes(raw[120:128], "little") == 0xFFFFFFFF
    assert int.from_bytes(raw[128:132], "little") == 32 * KiB
    assert int.from_bytes(raw[132:134], "little") == 32
    p = np.zeros(1, uapi.PARAMS_DTYPE)
    RequestLimits(max_segments=7).encode(p)
    assert p["types"][0] == uapi.UBLK_PARAM_TYPE_SEGMENT and p["dma"]["alignment"][0] == 0


def test_load_generator_keeps_to_max_segments(sim):
    """The simulator's load generator makes no request the block layer would not: a block
    size beyond max_segments pages is refused up front, one within runs and verifies."""
    backend = _Recording(4 * MiB)
    backend.max_segments = 8
    with Device(backend, sim, depth=16) as dev:
        with pytest.raises(ValueError, match="largest request"):
            sim.run_load(dev.dev_id, rw="randwrite", bs=64 * KiB, count=8)
        out = sim.run_load(dev.dev_id, rw="randrw", bs=32 * KiB, qd=8, count=200, verify=True)
        assert out["errors"] == 0 and out["verify_errors"] == 0
        assert backend.largest == 32 * KiB
