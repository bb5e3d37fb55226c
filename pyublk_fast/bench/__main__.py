"""Run the benchmark: `python -m pyublk_fast.bench [--quick] [--runtime S] [--json FILE]`."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile

from ..transport.sim import SimTransport
from .scenarios import scenarios


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyublk_fast.bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="1 s per scenario")
    ap.add_argument("--runtime", type=float, default=3.0, help="seconds per scenario (default 3)")
    ap.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    args = ap.parse_args(argv)
    runtime = 1.0 if args.quick else args.runtime
    rows = []
    print(f"pyublk_fast bench on the simulated driver ({platform.node()}, {platform.release()}, "
          f"{runtime:g} s per scenario)\n")
    hdr = f"{'scenario':36} {'IOPS':>10} {'MB/s':>8} {'p50 us':>8} {'p99 us':>8} {'p99.9':>8}  ratio to reference"
    print(hdr)
    print("-" * len(hdr))
    try:
        with SimTransport() as t, tempfile.TemporaryDirectory(dir="/var/tmp") as wd:
            for name, r, ref_name, ref in scenarios(t, runtime, wd):
                ratio = f"{r['iops'] / ref:.2f}x {ref_name} ({ref:,.0f})" if ref else ""
                err = f"  ERRORS {r['errors']}" if r["errors"] else ""
                print(f"{name:36} {r['iops']:>10,.0f} {r['mbps']:>8.1f} {r['lat_p50_us']:>8.1f} "
                      f"{r['lat_p99_us']:>8.1f} {r['lat_p999_us']:>8.1f}  {ratio}{err}", flush=True)
                rows.append(dict(scenario=name, reference=ref_name, reference_iops=ref,
                                 **{k: float(v) for k, v in r.items() if k != "hist"}))
    except KeyboardInterrupt:
        print("\ninterrupted: results so far are above", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=platform.uname()._asdict(), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
