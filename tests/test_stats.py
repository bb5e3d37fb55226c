"""Live statistics: the queues' counters, Device.stats(), the published file and `stats`."""
from __future__ import annotations

import errno
import json
import threading
import time

import numpy as np
import pytest

from pyublk_fast import aio, cli, stats
from pyublk_fast.backends.memory import MemoryBackend
from pyublk_fast.device import Device
from pyublk_fast.errors import BackendError
from pyublk_fast.util import wait_until

MiB = 1 << 20
SLOW_AT = 5 * MiB          # reads here wait on the ring
FULL_AT = 6 * MiB          # writes here fail with ENOSPC


class Marked(MemoryBackend):
    """A RAM disk whose reads at SLOW_AT wait until released and writes at FULL_AT fail."""

    def __init__(self, size):
        super().__init__(size)
        self.release = threading.Event()

    async def read(self, offset, buf):
        if offset == SLOW_AT:
            while not self.release.is_set():
                await aio.current().sleep(0.005)
        super().read(offset, buf)

    def write(self, offset, data):
        if offset == FULL_AT:
            raise BackendError(errno.ENOSPC)
        super().write(offset, data)


def test_counts_by_op_bytes_errno_and_in_flight(sim):
    backend = Marked(8 * MiB)
    with Device(backend, sim, depth=8) as dev, dev.open() as blk:
        before = dev.stats()
        for i in range(10):
            blk.pwrite(bytes([i]) * 8192, i * 8192)
        for i in range(4):
            assert blk.pread(4096, i * 8192) == bytes([i]) * 4096
        blk.flush()
        with pytest.raises(OSError) as ei:
            blk.pwrite(b"x" * 4096, FULL_AT)
        assert ei.value.errno == errno.ENOSPC
        s = dev.stats().summary(since=before)
        assert s["requests"] == {"read": 4, "write": 11, "flush": 1}
        assert s["bytes"] == {"read": 4 * 4096, "write": 10 * 8192}
        assert s["failed"] == 1 and s["errors"] == {"ENOSPC": 1}
        assert s["in_flight"] == 0 and s["iops"] > 0

        # a read that waits is counted in flight until it is committed, with its latency
        t = threading.Thread(target=blk.pread, args=(4096, SLOW_AT))
        t.start()
        assert wait_until(lambda: dev.stats().summary()["in_flight"] == 1, 10)
        wait = dev.stats()
        assert wait_until(lambda: dev.stats().time - wait.time >= 0.05, 10)
        backend.release.set()
        t.join(10)
        after = dev.stats().summary(since=wait)
        assert after["in_flight"] == 0 and after["requests"] == {"read": 1}
        # it waited >= 50 ms: bucket 2^25..2^26 ns or above, reported by its upper bound
        assert after["latency_us"]["p50"] >= 2 ** 26 / 1000
        totals = dev.stats().summary()
        assert totals["requests"]["read"] == 5 and totals["failed"] == 1


def test_counters_are_per_queue_and_sum(sim):
    with Device(MemoryBackend(8 * MiB), sim, queues=2, depth=8) as dev:
        sim.run_load(dev.dev_id, rw="randrw", bs=4096, qd=16, count=2000)
        snap = dev.stats()
        assert snap.counters.shape == (dev.nr_queues, stats.L["fields"])
        s = snap.summary()
        assert sum(s["requests"].values()) == 2000
        assert s["bytes"]["read"] + s["bytes"]["write"] == 2000 * 4096


def test_published_file_round_trip_and_cli(tmp_path, monkeypatch, capsys):
    """A server's StatsFile read by `stats`: totals, then the rates over the interval."""
    monkeypatch.setenv("PYUBLK_FAST_RUN_DIR", str(tmp_path))
    fields = stats.L["fields"]
    rows = np.zeros((2, fields), np.uint64)
    pub = stats.StatsFile(stats.stats_path(7), 2)
    stop = threading.Event()

    def server():                       # what the daemon does every 0.2 s, faster
        n = 0
        while not stop.is_set():
            n += 1
            rows[:, stats.L["reqs"]] = n * 100           # reads
            rows[:, stats.L["bytes"]] = n * 100 * 4096
            rows[:, stats.L["started"]] = rows[:, stats.L["done"]] = n * 100
            pub.publish(stats.Snapshot(time.time(), rows.copy()))
            stop.wait(0.02)

    th = threading.Thread(target=server)
    th.start()
    try:
        assert wait_until(lambda: stats.read_published(7).counters[0, 0] > 0, 10)
        got = stats.read_published(7)
        assert got.counters.shape == (2, fields)
        prom = tmp_path / "ublk.prom"
        assert cli.main(["stats", "-n", "7", "--json", "--interval", "0.2", "--prometheus", str(prom)]) == 0
    finally:
        stop.set()
        th.join()
    first, second = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert first["dev_id"] == 7 and first["requests"]["read"] > 0 and "iops" not in first
    assert second["iops"] > 0 and second["mb_per_s"] > 0 and second["seconds"] >= 0.2
    text = prom.read_text()
    reads = second["requests"]["read"] + first["requests"]["read"]
    assert f'ublk_requests_total{{dev="7",op="read"}} {float(reads)}' in text
    assert 'ublk_in_flight{dev="7"} 0.0' in text
    pub.remove()
    assert cli.main(["stats", "-n", "7"]) == 1
    assert "device 7 has no statistics" in capsys.readouterr().err
