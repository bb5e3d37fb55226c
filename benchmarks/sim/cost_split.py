"""Where an I/O's CPU goes on the simulated driver: driver thread vs server queue thread.

    python benchmarks/sim/cost_split.py [--runtime 3] [--qd 128] [--poll-us 0]

Runs the null backend (native, and pure Python) at 4 KiB random read and reads each
thread's on-CPU time from /proc/self/task/<tid>/schedstat (ns) around the run.
"""
import argparse
import threading

from pyublk_fast.backend import Backend
from pyublk_fast.backends.null import NullBackend
from pyublk_fast.device import Device
from pyublk_fast.transport.sim import SimTransport


class PyNull(Backend):
    def __init__(self, size):
        self.size = size

    def read(self, offset, buf):
        pass


def cpu_ns(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


def measure(t, backend, native, qd, runtime, poll_us):
    with Device(backend, t, depth=max(qd, 1), native=native, poll_us=poll_us) as dev:
        tids = {"driver": t.driver.native_thread_id, "server": dev._threads[0].native_id}
        before = {k: cpu_ns(v) for k, v in tids.items()}
        r = t.run_load(dev.dev_id, rw="randread", bs=4096, qd=qd, runtime=runtime)
        after = {k: cpu_ns(v) for k, v in tids.items()}
    n = r["completed"]
    return r["iops"], {k: (after[k] - before[k]) / n for k in tids}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runtime", type=float, default=3.0)
    ap.add_argument("--qd", type=int, default=128)
    ap.add_argument("--poll-us", type=float, default=0.0)
    a = ap.parse_args()
    print(f"4 KiB randread, QD{a.qd}, one queue, server poll {a.poll_us:g} us")
    print(f"{'backend':14} {'IOPS':>11} {'driver ns/IO':>13} {'server ns/IO':>13}")
    with SimTransport() as t:
        for name, be, native in (("null native", NullBackend(1 << 30), True),
                                 ("null python", PyNull(1 << 30), False)):
            iops, cost = measure(t, be, native, a.qd, a.runtime, a.poll_us)
            print(f"{name:14} {iops:>11,.0f} {cost['driver']:>13.0f} {cost['server']:>13.0f}")


if __name__ == "__main__":
    main()
