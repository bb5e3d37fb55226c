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
from pyublk_fast.backends.null import NullBackend
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
        t.quiesce_dev(old.dev_id)                  # quiesced already: accepted, nothing changes
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


def _refused_for_want_of(t, flag: int, version: str, call) -> bool:
    """Where the driver lacks ``flag``: call() is refused with EOPNOTSUPP naming the kernel
    version that brings it (True: the caller checks nothing else)."""
    if t.features() & flag:
        return False
    with pytest.raises(OSError) as e:
        call()
    assert e.value.errno == errno.EOPNOTSUPP and version in str(e.value), str(e.value)
    return True


def check_commands_that_need_the_disk(t) -> None:
    """UPDATE_SIZE, TRY_STOP_DEV and QUIESCE_DEV act on the block device: a device that
    has none yet (added, parameters set, not started) is ENODEV, whatever its flags."""
    want = uapi.UBLK_F_USER_RECOVERY | (t.features() & uapi.UBLK_F_QUIESCE)
    dev_id, _ = t.add_dev(-1, 1, 8, 64 * 1024, want)
    try:
        t.set_params(dev_id, MiB, 512)
        for flag, version, call in (
                (uapi.UBLK_F_UPDATE_SIZE, "6.16", lambda: t.update_size(dev_id, 4096)),
                (uapi.UBLK_F_SAFE_STOP_DEV, "7.0", lambda: t.try_stop_dev(dev_id)),
                (uapi.UBLK_F_QUIESCE, "6.16", lambda: t.quiesce_dev(dev_id))):
            if not _refused_for_want_of(t, flag, version, call):
                with pytest.raises(OSError) as e:
                    call()
                assert e.value.errno == errno.ENODEV, str(e.value)
        assert t.dev_info(dev_id).size == MiB
    finally:
        t.release(dev_id)
        t.del_dev(dev_id)


def check_resize_grows_a_live_device(t, directory) -> None:
    """Device.resize grows the backend and the block device while it serves: the old
    bytes stay, the new end takes data. Shrinking, a size off the block size and a
    backend that cannot grow are refused before anything changes; the driver itself
    takes any size (UPDATE_SIZE shrinks too): the refusal is ours."""
    backend = MemoryBackend(4 * MiB)
    with Device(backend, t, depth=16) as dev:
        if _refused_for_want_of(t, uapi.UBLK_F_UPDATE_SIZE, "6.16", lambda: dev.resize(8 * MiB)):
            return
        head, tail, new = (os.urandom(64 * 1024) for _ in range(3))
        with dev.open() as blk:
            blk.pwrite(head, 0)
            blk.pwrite(tail, 4 * MiB - len(tail))
        for size, why in ((2 * MiB, "shrinking is refused"), (4 * MiB + 100, "multiple of")):
            with pytest.raises(ValueError, match=why):
                dev.resize(size)
        assert t.dev_info(dev.dev_id).size == 4 * MiB and len(backend.data) == 4 * MiB
        dev.resize(12 * MiB)
        info = t.dev_info(dev.dev_id)
        assert info.size == 12 * MiB and info.state == uapi.UBLK_S_DEV_LIVE
        with dev.open() as blk:
            blk.pwrite(new, 12 * MiB - len(new))
            assert blk.pread(len(new), 12 * MiB - len(new)) == new
            assert blk.pread(len(head), 0) == head
            assert blk.pread(len(tail), 4 * MiB - len(tail)) == tail
            assert blk.pread(4096, 8 * MiB) == bytes(4096)
        assert len(backend.data) == 12 * MiB and bytes(backend.data[-len(new):]) == new
        t.update_size(dev.dev_id, (8 * MiB) >> uapi.SECTOR_SHIFT)
        assert t.dev_info(dev.dev_id).size == 8 * MiB
    with Device(NullBackend(MiB), t, depth=8) as dev:
        with pytest.raises(OSError) as e:
            dev.resize(2 * MiB)
        assert e.value.errno == errno.EOPNOTSUPP and "cannot change its size" in str(e.value)
        assert t.dev_info(dev.dev_id).size == MiB


def check_safe_stop_refuses_while_open(t) -> None:
    """Device.stop(safe=True) (TRY_STOP_DEV) refuses while the block device is open and
    the device serves on, data intact; once closed it stops and deletes it."""
    dev = Device(MemoryBackend(4 * MiB), t, depth=16).start()
    try:
        if _refused_for_want_of(t, uapi.UBLK_F_SAFE_STOP_DEV, "7.0", lambda: dev.stop(safe=True)):
            return
        data = os.urandom(256 * 1024)
        with dev.open() as blk:
            blk.pwrite(data, MiB)
            for call in (lambda: t.try_stop_dev(dev.dev_id), lambda: dev.stop(safe=True)):
                with pytest.raises(OSError) as e:
                    call()
                assert e.value.errno == errno.EBUSY, str(e.value)
            info = t.dev_info(dev.dev_id)
            assert info.state == uapi.UBLK_S_DEV_LIVE and info.started and dev.serving
            assert blk.pread(len(data), MiB) == data
        dev.stop(safe=True)
        assert dev.dev_id not in t.list_devs()
    finally:
        dev.stop()


CHECKS = {
    "is_a_transport": lambda t, d: check_is_a_transport(t),
    "lifecycle_and_info": check_lifecycle_and_info,
    "endpoint_shape": lambda t, d: check_endpoint_shape(t),
    "queues_capped_at_cpu_count": lambda t, d: check_queues_capped_at_cpu_count(t),
    "quiesce_hands_over": check_quiesce_hands_over,
    "quiesce_refused_without_recovery": lambda t, d: check_quiesce_refused_without_recovery(t),
    "commands_that_need_the_disk": lambda t, d: check_commands_that_need_the_disk(t),
    "resize_grows_a_live_device": check_resize_grows_a_live_device,
    "safe_stop_refuses_while_open": lambda t, d: check_safe_stop_refuses_while_open(t),
}
