"""Reaper benchmark: Cython (Ring + reap_cq, nogil) vs a C reference, plus codec costs.

Compiles benchmarks/reaper/nop_reap.c into a temp dir, then for every batch size runs the
C program and pyublk_fast._core.bench_reap alternately, keeping the best of --runs.
Prints a table; --json FILE also writes the numbers. Not a test.

    python3 benchmarks/reaper/run.py [--runs 7] [--ops 1048576] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from pyublk_fast._core import codec  # noqa: E402
from pyublk_fast._core.bench_reap import nop_reap  # noqa: E402
from pyublk_fast._core.ring import Ring  # noqa: E402
from pyublk_fast.util import kernel_release  # noqa: E402

BATCHES = (1, 4, 16, 64, 256, 1024, 4096)
ENTRIES = 4096


def build_c(tmp: Path) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        sys.exit("gcc not found: install build-essential")
    exe = tmp / "nop_reap"
    cmd = [gcc, "-O2", "-o", str(exe), str(HERE / "nop_reap.c"), "-luring"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"compiling the C reference failed (is liburing-dev installed?):\n{proc.stderr}")
    return exe


def run_c(exe: Path, batch: int, ops: int) -> tuple[float, int]:
    out = subprocess.run([str(exe), str(ENTRIES), str(batch), str(ops)],
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), int(out[1])


def ops_for(batch: int, base: int) -> int:
    """Fewer ops for tiny batches (one syscall per batch dominates), whole batches always."""
    ops = base // 4 if batch < 16 else base
    return max(batch, ops // batch * batch)


def bench_reaper(exe: Path, runs: int, base_ops: int) -> list[dict]:
    rows = []
    with Ring(ENTRIES) as ring:
        for batch in BATCHES:
            ops = ops_for(batch, base_ops)
            expect = ops * (ops - 1) // 2
            best_c = best_py = float("inf")
            for _ in range(runs):  # interleaved so drift hits both sides alike
                c_ns, c_sum = run_c(exe, batch, ops)
                py_ns, py_sum = nop_reap(ring, batch, ops)
                if c_sum != expect or py_sum != expect:
                    sys.exit(f"checksum mismatch at batch {batch}: C {c_sum}, Cython {py_sum}, "
                             f"expected {expect}")
                best_c, best_py = min(best_c, c_ns), min(best_py, py_ns)
            rows.append({"batch": batch, "ops": ops, "c_ns_per_op": round(best_c, 2),
                         "cython_ns_per_op": round(best_py, 2),
                         "ratio": round(best_c / best_py, 3)})  # throughput Cython / C
            print(f"  batch {batch:5d}: C {best_c:8.1f} ns/op  Cython {best_py:8.1f} ns/op  "
                  f"ratio {best_c / best_py:5.3f}", flush=True)
    return rows


def bench_codec(runs: int) -> dict:
    n = 1 << 20
    ud = np.random.default_rng(0).integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    batch = min(timeit.repeat(lambda: codec.decode_user_data_batch(ud), number=1, repeat=runs * 3))
    loops = 200_000
    u = int(ud[0])
    scalar = {
        "decode_user_data": lambda: codec.decode_user_data(u),
        "encode_user_data": lambda: codec.encode_user_data(7, 3, 11, True),
        "user_copy_pos": lambda: codec.user_copy_pos(1, 2, 3),
        "splice_pos": lambda: codec.splice_pos(1, 2, 3),
    }
    empty = min(timeit.repeat(lambda: None, number=loops, repeat=runs)) / loops
    out = {"decode_user_data_batch_ns_per_entry": round(batch / n * 1e9, 3),
           "lambda_overhead_ns": round(empty * 1e9, 1)}
    for name, fn in scalar.items():
        t = min(timeit.repeat(fn, number=loops, repeat=runs)) / loops
        out[f"{name}_ns_per_call"] = round((t - empty) * 1e9, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="repetitions per side; best is kept")
    ap.add_argument("--ops", type=int, default=1 << 20, help="NOPs per run (a quarter below batch 16)")
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    args = ap.parse_args()
    if args.runs < 1 or args.ops < 1:
        ap.error("--runs and --ops must be >= 1")

    print(f"kernel {kernel_release()}, python {platform.python_version()}, "
          f"{os.cpu_count()} cpus, ring {ENTRIES} entries, best of {args.runs}")
    with tempfile.TemporaryDirectory(prefix="pyublk-reaper-") as tmp:
        exe = build_c(Path(tmp))
        rows = bench_reaper(exe, args.runs, args.ops)
    codec_res = bench_codec(args.runs)

    print("\n| batch | ops | C ns/op | Cython ns/op | Cython/C throughput |")
    print("|------:|----:|--------:|-------------:|--------------------:|")
    for r in rows:
        print(f"| {r['batch']} | {r['ops']} | {r['c_ns_per_op']:.1f} | {r['cython_ns_per_op']:.1f} "
              f"| {r['ratio']:.3f} |")
    print("\ncodec:")
    for k, v in codec_res.items():
        print(f"  {k:40s} {v}")
    worst = min(r["ratio"] for r in rows)
    print(f"\nworst Cython/C throughput ratio: {worst:.3f} (target >= 0.95)")
    if args.json:
        args.json.write_text(json.dumps({"kernel": kernel_release(), "runs": args.runs,
                                         "reaper": rows, "codec": codec_res}, indent=2) + "\n")


if __name__ == "__main__":
    main()
