"""The loop backend on the simulated driver against fio on the same file, in paired rounds.

    python benchmarks/sim/loop_vs_fio.py [--rounds 5] [--runtime 2] [--rw randread,randwrite]
        [--qd 32] [--submit-chunk 4,1000] [--poll-us auto,0,50] [--out DIR]

One bench run measures fio once and our server once, seconds apart; on a shared VM the
disk's speed drifts more than that between them. Here every round brackets each of our
variants with fio runs (fio, A, fio, B, fio; variant order alternating per round), and a
variant's ratio is its IOPS over the mean of the two fio runs around it, so drift within
a round cancels. The figure is the median of the per-round ratios, with their range.
Variants are every --submit-chunk x --poll-us pair.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics

from pyublk_fast.backends.loop import LoopBackend
from pyublk_fast.bench import refs
from pyublk_fast.bench.report import emit_paired, paired_ratio
from pyublk_fast.bench.runner import Workdir
from pyublk_fast.device import DEFAULT_POLL_US, Device
from pyublk_fast.transport.sim import SimTransport


def ours(t: SimTransport, path: str, rw: str, qd: int, runtime: float, chunk: int,
         poll: float | None) -> float:
    with Device(LoopBackend(path), t, depth=max(128, qd), data_path="copy",
                submit_chunk=chunk, poll_us=poll) as dev:
        r = t.run_load(dev.dev_id, rw=rw, bs=4096, qd=qd, runtime=runtime)
    if r["errors"]:
        raise RuntimeError(f"{r['errors']} I/O errors")
    return float(r["iops"])


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def polls(text: str) -> list[float | None]:
    """Poll budgets in us; 'auto' is Device's own default."""
    return [None if x == "auto" else float(x) for x in text.split(",")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runtime", type=float, default=2.0, help="seconds per point")
    ap.add_argument("--rw", default="randread,randwrite")
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--size", type=int, default=256, help="backing file MiB")
    ap.add_argument("--submit-chunk", type=ints, default=[4])
    ap.add_argument("--poll-us", type=polls, default=[None], help="e.g. auto,0,50 (default auto)")
    ap.add_argument("--out", default="", help="write loop_vs_fio.md and .json here")
    a = ap.parse_args()
    variants = list(itertools.product(a.submit_chunk, a.poll_us))
    rows = []
    with Workdir(a.size << 20) as wd, SimTransport() as t:
        path = wd.file("raw")
        for rnd in range(a.rounds):
            for rw in a.rw.split(","):
                before = refs.fio(path, rw, 4096, a.qd, a.runtime)["iops"]
                rows.append(dict(round=rnd, rw=rw, who="fio", iops=before))
                for v in variants if rnd % 2 == 0 else variants[::-1]:
                    iops = ours(t, path, rw, a.qd, a.runtime, *v)
                    after = refs.fio(path, rw, 4096, a.qd, a.runtime)["iops"]
                    rows.append(dict(round=rnd, rw=rw, who=str(v), iops=iops, ratio=2 * iops / (before + after)))
                    rows.append(dict(round=rnd, rw=rw, who="fio", iops=after))
                    before = after
    lines = [f"loop (native, copy) on the sim vs fio (io_uring, O_DIRECT, same file), 4k QD{a.qd}, "
             f"{a.runtime:g} s per point, {a.rounds} rounds (variant order alternating); "
             f"{os.cpu_count()} CPUs; medians; each ratio against the fio runs just before and after (min..max)", "",
             "| workload | server | submit_chunk | poll_us | IOPS | vs fio |", "|---|---|---|---|---|---|"]
    for rw in a.rw.split(","):
        ref = [r["iops"] for r in rows if r["rw"] == rw and r["who"] == "fio"]
        lines.append(f"| {rw} | fio | | | {statistics.median(ref):,.0f} | |")
        for v in variants:
            mine = [r for r in rows if r["rw"] == rw and r["who"] == str(v)]
            poll = f"{DEFAULT_POLL_US:g} (default)" if v[1] is None else f"{v[1]:g}"
            lines.append(f"| {rw} | pyublk_fast | {v[0]} | {poll} | {statistics.median(r['iops'] for r in mine):,.0f} "
                         f"| {paired_ratio([r['ratio'] for r in mine])} |")
    emit_paired("\n".join(lines), rows, a.out, "loop_vs_fio")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
