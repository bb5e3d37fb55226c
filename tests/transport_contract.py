"""The transport contract (pyublk_fast.transport.base), checked the same way on every
transport: the simulated driver on the host (tests/conformance/test_transport_contract.py)
and the real kernel in the VM (tests/kernel/test_kernel_contract.py).

Each check takes an open transport and a directory for backing files, and asserts on
what the driver reports and on the bytes that come back.
"""
from __future__ import annotations

import errno
import os
import threading

import pytest

from pyublk_fast import uapi
from pyublk_fast.backends.loop import LoopBackend
from pyublk_fast.backends.memory import MemoryBackend
from pyublk_fast.device import Device
from pyublk_fast.transport.base import DevInfo, QueueEndpoint, Transport

MiB = 1 << 20


def _loop_file(directory, size=8 * MiB) -> str:
    path = os.path.join(directory, "contract.img")
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


def check_is_a_transport(t) -> None:
    assert isinstance(t, Transport)
    assert t.name in ("kernel", "sim")
    assert isinstance(t.features(), int) and t.features() & uapi.UBLK_F_USER_RECOVERY


def check_lifecycle_and_info(t, directory) -> None:
    backend = MemoryBackend(4 * MiB)
    with Device(backend, t, depth=16) as dev:
        info = t.dev_info(dev.dev_id)
        assert isinstance(info, DevInfo)
        assert (info.dev_id, info.nr_hw_queues, info.queue_depth) == (dev.dev_id, 1, 16)
        assert info.state == uapi.UBLK_S_DEV_LIVE and info.state_name == "LIVE" and info.started
        assert info.size == 4 * MiB and info.logical_block_size == 512
        assert info.server_alive
        assert info.as_dict()["state_name"] == "LIVE"
        assert str(dev.dev_id) in t.block_path(dev.dev_id)
        assert dev.dev_id in t.list_devs()
        data = os.urandom(64 * 1024)
        with dev.open() as blk:
            blk.pwrite(data, 128 * 1024)
            assert blk.pread(len(data), 128 * 1024) == data
        assert bytes(backend.data[128 * 1024:128 * 1024 + len(data)]) == data
        dev_id = dev.dev_id
    assert dev_id not in t.list_devs()
    with pytest.raises(OSError) as e:
        t.dev_info(dev_id)
    assert e.value.errno == errno.ENODEV


def check_endpoint_shape(t) -> None:
    dev_id, _ = t.add_dev(-1, 1, 8, 64 * 1024, 0)
    try:
        t.set_params(dev_id, MiB, 512)
        ep = t.queue_endpoint(dev_id, 0)
        assert isinstance(ep, QueueEndpoint) and ep.q_id == 0
        assert ep.iods.nbytes >= 8 * 24 and ep.channel.q_id == 0
        with pytest.raises(ValueError) as e:
            t.queue_endpoint(dev_id, 1)
        assert "has 1 queues" in str(e.value)
    finally:
        t.release(dev_id)
        t.del_dev(dev_id)


def check_queues_capped_at_cpu_count(t) -> None:
    """More queues than CPUs: the driver makes one per CPU and the device serves them all."""
    cpus = os.cpu_count() or 1
    backend = MemoryBackend(2 * MiB)
    with Device(backend, t, queues=cpus + 2, depth=8) as dev:
        assert t.dev_info(dev.dev_id).nr_hw_queues == cpus == dev.nr_queues
        data = os.urandom(256 * 1024)
        with dev.open() as blk:
            blk.pwrite(data, 0)
            assert blk.pread(len(data), 0) == data


def check_quiesce_hands_over(t, directory) -> None:
    """quiesce() parks new I/O; a new server recovers the device and serves it, data intact."""
    if not t.features() & uapi.UBLK_F_QUIESCE:
        with Device(MemoryBackend(MiB), t, recovery="reissue") as dev:
            with pytest.raises(OSError) as e:
                dev.quiesce()
            assert e.value.errno == errno.EOPNOTSUPP and "6.16" in str(e.value)
        return
    path = _loop_file(directory)
    old = Device(LoopBackend(path), t, depth=16, recovery="reissue").start()
    new = None
    try:
        payload = os.urandom(MiB)
        with old.open() as blk:
            blk.pwrite(payload, 2 * MiB)
        old.quiesce()
        assert t.dev_info(old.dev_id).state == uapi.UBLK_S_DEV_QUIESCED
        got = {}
        reader_done = threading.Event()

        def read_while_quiesced():
            with old.open() as blk2:
                got["data"] = blk2.pread(MiB, 2 * MiB)
            reader_done.set()

        th = threading.Thread(target=read_while_quiesced, daemon=True)
        th.start()
        assert not reader_done.wait(0.3)           # parked: no server serves it
        new = Device(LoopBackend(path), t, depth=16, recovery="reissue", dev_id=old.dev_id)
        new.recover()
        assert reader_done.wait(20) and got["data"] == payload
        assert t.dev_info(old.dev_id).state == uapi.UBLK_S_DEV_LIVE
    finally:
        (new or old).stop()


def check_quiesce_refused_without_recovery(t) -> None:
    with Device(MemoryBackend(MiB), t) as dev:
        with pytest.raises(OSError) as e:
            dev.quiesce()
        assert e.value.errno == errno.EOPNOTSUPP and "recovery" in str(e.value)


CHECKS = {
    "is_a_transport": lambda t, d: check_is_a_transport(t),
    "lifecycle_and_info": check_lifecycle_and_info,
    "endpoint_shape": lambda t, d: check_endpoint_shape(t),
    "queues_capped_at_cpu_count": lambda t, d: check_queues_capped_at_cpu_count(t),
    "quiesce_hands_over": check_quiesce_hands_over,
    "quiesce_refused_without_recovery": lambda t, d: check_quiesce_refused_without_recovery(t),
}
