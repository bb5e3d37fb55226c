"""The simulated driver's side of the live operations, beyond the transport contract: how
it counts opens of the block device for TRY_STOP_DEV, and UPDATE_SIZE's range and states."""
from __future__ import annotations

import errno

import pytest

from pyublk_fast import uapi
from pyublk_fast.backends.memory import MemoryBackend
from pyublk_fast.device import Device

MiB = 1 << 20


def _busy(sim, dev_id: int) -> bool:
    try:
        sim.try_stop_dev(dev_id)
    except OSError as exc:
        assert exc.errno == errno.EBUSY, exc
        return True
    return False


def test_try_stop_waits_for_every_opener(sim):
    dev = Device(MemoryBackend(MiB), sim, depth=8).start()
    try:
        a, b = dev.open(), dev.open()
        assert _busy(sim, dev.dev_id)
        a.close()
        a.close()                                # closing twice counts once
        assert _busy(sim, dev.dev_id)
        b.close()
        assert not _busy(sim, dev.dev_id)        # stopped now
        assert not sim.dev_info(dev.dev_id).started
        with pytest.raises(OSError) as e:
            sim.try_stop_dev(dev.dev_id)
        assert e.value.errno == errno.ENODEV
    finally:
        dev.stop()


def test_an_earlier_devices_opener_does_not_count(sim):
    """A front still open on a deleted device closes after a new device took its id: the
    new device's count is not touched (the block layer's openers are per disk)."""
    old = Device(MemoryBackend(MiB), sim, depth=8).start()
    stale = old.open()
    old.stop()
    new = Device(MemoryBackend(MiB), sim, depth=8, dev_id=old.dev_id).start()
    try:
        held = new.open()
        stale.close()
        assert _busy(sim, new.dev_id)
        held.close()
        assert not _busy(sim, new.dev_id)
    finally:
        new.stop()


def test_update_size_takes_any_capacity_while_quiesced(sim):
    """The kernel sets any capacity while the disk exists, quiesced too; GET_PARAMS gives
    back exactly what was set, even past what fits in bytes."""
    dev = Device(MemoryBackend(MiB), sim, depth=8, recovery="reissue").start()
    try:
        dev.quiesce()
        assert sim.dev_info(dev.dev_id).state == uapi.UBLK_S_DEV_QUIESCED
        huge = (1 << 60) + 7
        sim.update_size(dev.dev_id, huge)
        assert sim.get_params(dev.dev_id)["dev_sectors"] == huge
        assert sim.dev_info(dev.dev_id).size == huge << uapi.SECTOR_SHIFT
        sim.update_size(dev.dev_id, 0)
        assert sim.dev_info(dev.dev_id).size == 0
    finally:
        sim.stop_dev(dev.dev_id)
        sim.del_dev(dev.dev_id)
