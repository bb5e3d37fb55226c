"""Live statistics of a device's queues, and what they mean over an interval.

Each queue counts in C as it serves, without locks or per-request clock reads
(``Queue.stats``, laid out as ``STATS_LAYOUT``): requests and bytes by op, failed
requests by errno, requests taken and committed (their difference is in flight), and a
histogram of the time from taking a request to committing it in log2 buckets. That
time is read once per turn of the queue's loop, so a latency is known to within one
turn (a few microseconds under load; a request taken and committed in the same turn
counts as under 2 ns).

``Device.stats()`` reads the counters of a device served in this process. A CLI server
publishes its device's counters every 0.2 s to ``<state dir>/<dev_id>.stats`` (a small
file of uint64s, see ``StatsFile``), which ``python -m pyublk_fast stats`` maps read-only:
nothing asks the server anything, so a busy or stuck server can still be looked at.
"""
from __future__ import annotations

import errno as _errno
import mmap
import os
import time
from dataclasses import dataclass

import numpy as np

from ._core.queue import STATS_LAYOUT as L
from .records import state_dir

#: The op slots of the counters, in order.
OPS = ("read", "write", "flush", "discard", "write_zeroes", "other")
MAGIC = int.from_bytes(b"PYUBLKST", "little")
VERSION = 1
#: StatsFile header: magic, version, queues, fields per queue, time (ns, CLOCK_REALTIME).
HEADER = 5


@dataclass(frozen=True)
class Snapshot:
    """The counters of every queue of a device at one time."""

    time: float                # seconds (time.time())
    counters: np.ndarray       # (queues, fields) uint64

    def _sum(self, since: "Snapshot | None") -> np.ndarray:
        total = self.counters.sum(axis=0, dtype=np.uint64)
        if since is not None:
            total = total - since.counters.sum(axis=0, dtype=np.uint64)
        return total

    def summary(self, since: "Snapshot | None" = None) -> dict:
        """Totals (since the server started), or with ``since`` the interval's counts and
        rates: requests/bytes by op, iops, mb_per_s, failures by errno name, in flight
        now, and latency percentiles (the upper bound of their log2 bucket, us)."""
        c = self._sum(since)
        now = self.counters.sum(axis=0, dtype=np.uint64)
        reqs = {op: int(c[L["reqs"] + i]) for i, op in enumerate(OPS) if c[L["reqs"] + i]}
        nbytes = {op: int(c[L["bytes"] + i]) for i, op in enumerate(OPS) if c[L["bytes"] + i]}
        errs = c[L["errno"]:L["errno"] + L["nerrno"]]
        out = dict(queues=len(self.counters), requests=reqs, bytes=nbytes,
                   in_flight=int(now[L["started"]]) - int(now[L["done"]]),
                   failed=int(c[L["failed"]]),
                   errors={_errname(e, L["nerrno"]): int(n) for e, n in enumerate(errs) if n},
                   latency_us=_percentiles(c[L["hist"]:L["hist"] + L["nhist"]]))
        if since is not None:
            dt = max(self.time - since.time, 1e-9)
            out.update(seconds=round(dt, 3), iops=round(int(c[L["done"]]) / dt, 1),
                       mb_per_s=round(sum(nbytes.values()) / dt / 1e6, 3))
        return out


def _errname(e: int, n: int) -> str:
    name = _errno.errorcode.get(e, str(e))
    return f"{name} or above" if e == n - 1 else name


def _percentiles(hist: np.ndarray) -> dict:
    """p50/p99/p99.9 in us from log2(ns) bucket counts: the bucket's upper bound."""
    total = int(hist.sum())
    if not total:
        return {}
    cum = np.cumsum(hist)
    out = {}
    for name, q in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)):
        b = int(np.searchsorted(cum, q * total))
        out[name] = (1 << (b + 1)) / 1000.0
    return out


def snapshot(queues) -> Snapshot:
    """A Snapshot of Queue objects (Device.stats uses it)."""
    rows = [q.stats.copy() for q in queues]
    return Snapshot(time.time(), np.array(rows, np.uint64).reshape(len(rows), L["fields"]))


def stats_path(dev_id: int) -> str:
    """Where a CLI server publishes device dev_id's counters."""
    return os.path.join(state_dir(), f"{dev_id}.stats")


class StatsFile:
    """A server's published counters: a header and (queues, fields) uint64s, rewritten in
    place (readers may see a row mid-update: counters only grow, so at worst a reading is
    a fraction of a turn old)."""

    def __init__(self, path: str, nr_queues: int):
        self.path = path
        fields = L["fields"]
        size = (HEADER + nr_queues * fields) * 8
        fd = os.open(path + ".tmp", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._arr = np.frombuffer(self._map, np.uint64)
        self._arr[:HEADER - 1] = (MAGIC, VERSION, nr_queues, fields)
        self._rows = self._arr[HEADER:].reshape(nr_queues, fields)
        os.replace(path + ".tmp", path)

    def publish(self, snap: Snapshot) -> None:
        self._rows[:len(snap.counters)] = snap.counters
        self._arr[HEADER - 1] = int(snap.time * 1e9)

    def remove(self) -> None:
        del self._rows, self._arr
        self._map.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def read_published(dev_id: int) -> Snapshot:
    """The counters a CLI server last published for dev_id; OSError naming the problem."""
    path = stats_path(dev_id)
    try:
        with open(path, "rb") as fh:
            raw = np.frombuffer(fh.read(), np.uint64)
    except FileNotFoundError:
        raise FileNotFoundError(_errno.ENOENT, f"device {dev_id} has no statistics in "
                                f"{state_dir()}: no server of this state directory serves it "
                                "(set PYUBLK_FAST_RUN_DIR as its server had it)") from None
    if len(raw) < HEADER or raw[0] != MAGIC or raw[1] != VERSION or raw[3] != L["fields"]:
        raise OSError(_errno.EINVAL, f"{path}: not a statistics file of this pyublk_fast "
                      "version (restart the server with this version)")
    nq = int(raw[2])
    rows = raw[HEADER:HEADER + nq * L["fields"]].reshape(nq, L["fields"]).copy()
    return Snapshot(int(raw[HEADER - 1]) / 1e9, rows)


def format_summary(dev_id: int, s: dict) -> str:
    """The text `stats` prints for one summary (with rates when it has them)."""
    lat = s["latency_us"]
    head = f"dev {dev_id}: {s['queues']} queue(s), {s['in_flight']} in flight"
    if "iops" in s:
        head += f"; {s['iops']:,.0f} IOPS, {s['mb_per_s']:,.1f} MB/s over {s['seconds']} s"
    else:
        head += "; since its server started"
    lines = [head]
    if lat:
        lines.append("    latency " + ", ".join(f"{k} <= {v:,.4g} us" for k, v in lat.items()))
    ops = [f"{op} {n:,}" + (f" ({s['bytes'][op] / 1e6:,.1f} MB)" if op in s["bytes"] else "")
           for op, n in s["requests"].items()]
    lines.append("    " + (", ".join(ops) if ops else "no requests"))
    if s["failed"]:
        lines.append(f"    failed {s['failed']:,}: " + ", ".join(f"{k} {v:,}" for k, v in s["errors"].items()))
    return "\n".join(lines)


def write_prometheus(path: str, dev_id: int, snap: Snapshot) -> None:
    """The counters in Prometheus' text format, written atomically to path (for the node
    exporter's textfile collector), by prometheus_client. Latency buckets are the log2
    ones (le = their upper bound in seconds); no _sum: the queues do not keep one."""
    from prometheus_client import CollectorRegistry, write_to_textfile
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    c = snap.counters.sum(axis=0, dtype=np.uint64)
    dev = str(dev_id)

    class Collector:
        def collect(self):
            reqs = CounterMetricFamily("ublk_requests", "Requests committed", labels=["dev", "op"])
            nbytes = CounterMetricFamily("ublk_bytes", "Bytes moved", labels=["dev", "op"])
            for i, op in enumerate(OPS):
                reqs.add_metric([dev, op], int(c[L["reqs"] + i]))
                nbytes.add_metric([dev, op], int(c[L["bytes"] + i]))
            failed = CounterMetricFamily("ublk_failed_requests", "Requests failed, by errno",
                                         labels=["dev", "errno"])
            for e in range(L["nerrno"]):
                if c[L["errno"] + e]:
                    failed.add_metric([dev, _errname(e, L["nerrno"])], int(c[L["errno"] + e]))
            inflight = GaugeMetricFamily("ublk_in_flight", "Requests in flight", labels=["dev"])
            inflight.add_metric([dev], int(c[L["started"]]) - int(c[L["done"]]))
            hist = HistogramMetricFamily("ublk_request_latency_seconds",
                                         "Fetch-to-commit time (log2 buckets, per loop turn)",
                                         labels=["dev"])
            cum = np.cumsum(c[L["hist"]:L["hist"] + L["nhist"]])
            buckets = [(repr((1 << (b + 1)) / 1e9), int(n)) for b, n in enumerate(cum[:-1])]
            hist.add_metric([dev], buckets + [("+Inf", int(cum[-1]))], None)
            yield from (reqs, nbytes, failed, inflight, hist)

    registry = CollectorRegistry()
    registry.register(Collector())
    write_to_textfile(path, registry)
