"""Where the loop-vs-fio gap goes: the backing disk's issue/complete cycle, from ftrace.

    python benchmarks/sim/disk_cycles.py [--pairs 3] [--rw randwrite] [--qd 32] [--poll-us N]

Needs root and tracefs. Runs fio and our loop server (sim, copy path) on the same file,
alternately, records block_rq_issue/block_rq_complete on the file's disk for a slice of
each run, and splits the trace into cycles at each burst of completions (completions
less than 5 us apart). Per run it prints medians per cycle:

- done/cycle: requests completed in the burst (32 at QD32: the whole queue at once)
- to issue: burst start -> the next request reaching the disk (the turnaround: wake-ups
  and hand-offs before the disk gets work again)
- spread: first -> last issue before the next burst
- disk: last issue -> next burst
"""
from __future__ import annotations

import argparse
import bisect
import os
import statistics
import threading
import time

from pyublk_fast.backends.loop import LoopBackend
from pyublk_fast.bench import refs
from pyublk_fast.bench.runner import Workdir
from pyublk_fast.device import DEFAULT_POLL_US, Device
from pyublk_fast.transport.sim import SimTransport

TRACEFS = "/sys/kernel/tracing"
EVENTS = ("block/block_rq_issue", "block/block_rq_complete")
BURST_GAP = 5e-6


def _write(name: str, value: str) -> None:
    with open(os.path.join(TRACEFS, name), "w") as f:
        f.write(value)


def disk_of(path: str) -> str:
    """'major,minor' of the whole disk holding path, as block events print it."""
    dev = os.stat(path).st_dev
    sys_dir = os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if os.path.exists(os.path.join(sys_dir, "partition")):
        sys_dir = os.path.dirname(sys_dir)
    with open(os.path.join(sys_dir, "dev")) as f:
        return f.read().strip().replace(":", ",")


def record(seconds: float) -> list[tuple[float, str, str]]:
    """(time, event, dev) of block issue/complete events over the next `seconds`."""
    _write("trace", "")
    _write("tracing_on", "1")
    time.sleep(seconds)
    _write("tracing_on", "0")
    out = []
    with open(os.path.join(TRACEFS, "trace")) as f:
        for line in f:
            if line.startswith("#"):
                continue
            head, _, rest = line.partition(": block_rq_")
            if not rest:
                continue
            event, _, args = rest.partition(": ")
            out.append((float(head.rsplit(" ", 1)[1]), event, args.split(" ", 1)[0]))
    return out


def traced(run, delay: float, seconds: float) -> list[tuple[float, str, str]]:
    """Call run() while recording `seconds` of block events from `delay` seconds into it."""
    got = []
    tracer = threading.Thread(target=lambda: (time.sleep(delay), got.append(record(seconds))))
    tracer.start()
    try:
        run()
    finally:
        tracer.join()
    return got[0]


def cycles(events: list[tuple[float, str, str]], disk: str) -> dict:
    issues = sorted(t for t, e, d in events if e == "issue" and d == disk)
    done = sorted(t for t, e, d in events if e == "complete" and d == disk)
    if len(done) < 2 or not issues:
        return {}
    bursts = [done[0]] + [b for a, b in zip(done, done[1:]) if b - a > BURST_GAP]
    rows = []
    for start, end in zip(bursts, bursts[1:]):
        i0, i1 = bisect.bisect_left(issues, start), bisect.bisect_left(issues, end)
        if i1 > i0:
            n = bisect.bisect_left(done, end) - bisect.bisect_left(done, start)
            rows.append((n, issues[i0] - start, issues[i1 - 1] - issues[i0], end - issues[i1 - 1]))
    span = done[-1] - done[0]
    med = [statistics.median(col) for col in zip(*rows)] if rows else [0] * 4
    return dict(iops=len(done) / span, cycles=len(rows), per_cycle=med[0], to_issue_us=med[1] * 1e6,
                spread_us=med[2] * 1e6, disk_us=med[3] * 1e6)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--rw", default="randwrite")
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--runtime", type=float, default=1.5)
    ap.add_argument("--slice", type=float, default=0.3, help="seconds traced in the middle of each run")
    ap.add_argument("--poll-us", type=float, default=DEFAULT_POLL_US, help="our server's poll budget")
    ap.add_argument("--submit-chunk", type=int, default=4)
    a = ap.parse_args()
    if not os.access(os.path.join(TRACEFS, "tracing_on"), os.W_OK):
        raise SystemExit(f"needs root and tracefs at {TRACEFS}")
    with open(os.path.join(TRACEFS, "buffer_size_kb")) as f:
        old_size = f.read().split()[0]
    _write("buffer_size_kb", "32768")      # per CPU: a slice at 200k IOPS fits
    for event in EVENTS:
        _write(f"events/{event}/enable", "1")
    print("| run | server | IOPS | cycles | done/cycle | to issue (us) | spread (us) | disk (us) |")
    print("|---|---|---|---|---|---|---|---|")
    try:
        with Workdir(256 << 20) as wd, SimTransport() as t:
            path = wd.file("raw")
            disk = disk_of(path)
            for i in range(a.pairs):
                for who in ("fio", "pyublk_fast"):
                    delay = (a.runtime - a.slice) / 2
                    if who == "fio":
                        ev = traced(lambda: refs.fio(path, a.rw, 4096, a.qd, a.runtime), delay, a.slice)
                    else:
                        with Device(LoopBackend(path), t, depth=max(128, a.qd), data_path="copy",
                                    poll_us=a.poll_us, submit_chunk=a.submit_chunk) as dev:
                            ev = traced(lambda: t.run_load(dev.dev_id, rw=a.rw, bs=4096, qd=a.qd,
                                                           runtime=a.runtime), delay, a.slice)
                    c = cycles(ev, disk)
                    if not c:
                        print(f"| {i} | {who} | no I/O traced on disk {disk} | | | | | |")
                        continue
                    print(f"| {i} | {who} | {c['iops']:,.0f} | {c['cycles']} | {c['per_cycle']:.0f} "
                          f"| {c['to_issue_us']:.0f} | {c['spread_us']:.0f} | {c['disk_us']:.0f} |", flush=True)
    finally:
        _write("tracing_on", "0")
        for event in EVENTS:
            _write(f"events/{event}/enable", "0")
        _write("buffer_size_kb", old_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
