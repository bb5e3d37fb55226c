"""Same fio jobs against kublk's and our null/loop devices, in one VM run (real ublk driver).

    tools/vm/build-kublk
    tools/vm/run -t 600 -o /tmp/out -- python3 benchmarks/kernel/vs_kublk.py --out /tmp/out

Loop devices are backed by a brd RAM disk (/dev/ram0, O_DIRECT capable) so the
backing store is the same for both servers. Prints a Markdown table (QD32 4k
randread IOPS, QD1 4k randread mean/p50 latency) and writes JSON next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "kernel"))
from ublk_ktest import kublk_path, wait_for_path  # noqa: E402

RAM = "/dev/ram0"


def sh(*cmd: str, timeout: float = 120) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stdout}{res.stderr}")
    return res.stdout


def fio(path: str, qd: int, runtime: float, rw: str = "randread") -> dict:
    out = sh("fio", "--output-format=json", "--name=b", f"--filename={path}", f"--rw={rw}",
             "--bs=4k", f"--iodepth={qd}", "--ioengine=io_uring", "--direct=1", "--time_based",
             f"--runtime={runtime}", "--ramp_time=0.5", "--size=128M", timeout=runtime + 60)
    job = json.loads(out[out.index("{"):])["jobs"][0]
    r = job["read"] if rw.endswith("read") else job["write"]
    return {"iops": r["iops"], "lat_mean_us": r["clat_ns"]["mean"] / 1000,
            "lat_p50_us": r["clat_ns"]["percentile"]["50.000000"] / 1000}


def kublk_add(kublk: str, args: list[str]) -> tuple[str, callable]:
    out = sh(kublk, "add", *args)          # the kernel picks the id; kublk prints it
    found = re.search(r"^dev id (\d+):", out, re.M)
    if not found:
        raise RuntimeError(f"kublk add printed no device id: {out}")
    n = found.group(1)
    path = f"/dev/ublkb{n}"
    assert wait_for_path(path, True, 10), path
    return path, lambda: sh(kublk, "del", "-n", n)


def ours_add(args: list[str]) -> tuple[str, callable]:
    out = sh(sys.executable, "-m", "pyublk_fast", "add", *args, timeout=60)
    path = out.strip().splitlines()[-1]
    n = path[len("/dev/ublkb"):]
    return path, lambda: sh(sys.executable, "-m", "pyublk_fast", "del", "-n", n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=4.0)
    ap.add_argument("--out", default="")
    ap.add_argument("--queues", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="repeat every pair, alternating order")
    ap.add_argument("--ours-extra", default="",
                    help="extra options for our `add` (e.g. '--submit-chunk 32 --poll-us 50')")
    a = ap.parse_args()
    extra = shlex.split(a.ours_extra)
    kublk = kublk_path()
    if kublk is None:
        sys.exit("kublk not built: run tools/vm/build-kublk on the host first")
    os.chdir(REPO)
    subprocess.run(["modprobe", "brd", "rd_nr=1", "rd_size=262144"], check=False)
    q = str(a.queues)
    cases = [
        ("null", "kublk", lambda: kublk_add(kublk, ["-t", "null", "-q", q, "-d", "128"])),
        ("null", "pyublk_fast", lambda: ours_add(["-t", "null", "-q", q, "-d", "128", *extra])),
        ("null -z", "kublk", lambda: kublk_add(kublk, ["-t", "null", "-q", q, "-d", "128", "-z"])),
        ("null -z", "pyublk_fast", lambda: ours_add(["-t", "null", "-q", q, "-d", "128", "-z", *extra])),
        ("loop", "kublk", lambda: kublk_add(kublk, ["-t", "loop", "-q", q, "-d", "128", RAM])),
        ("loop", "pyublk_fast", lambda: ours_add(["-t", "loop", "-q", q, "-d", "128", "-f", RAM, *extra])),
        ("loop -z", "kublk", lambda: kublk_add(kublk, ["-t", "loop", "-q", q, "-d", "128", "-z", RAM])),
        ("loop -z", "pyublk_fast", lambda: ours_add(["-t", "loop", "-q", q, "-d", "128", "-z", "-f", RAM, *extra])),
    ]
    rows = []
    pairs = [cases[i:i + 2] for i in range(0, len(cases), 2)]     # (kublk, ours) per target
    for rnd in range(a.rounds):
        for pair in pairs:
            # alternate who goes first, so drift in a noisy VM hits both servers alike
            for target, server, add in (pair if rnd % 2 == 0 else pair[::-1]):
                row = dict(target=target, server=server, round=rnd)
                try:
                    path, remove = add()
                except Exception as exc:   # noqa: BLE001 - reported in the table
                    rows.append(dict(row, error=str(exc)[:200]))
                    continue
                try:
                    qd32 = fio(path, 32, a.runtime)
                    qd1 = fio(path, 1, a.runtime)
                    rows.append(dict(row, qd32_iops=qd32["iops"], qd1_lat_mean_us=qd1["lat_mean_us"],
                                     qd1_lat_p50_us=qd1["lat_p50_us"]))
                finally:
                    remove()
                time.sleep(0.2)
    lines = [f"kernel {os.uname().release}, qemu TCG, {os.cpu_count()} vCPUs, 4k randread, "
             f"{a.runtime:g} s per point, queues {q}, {a.rounds} rounds (order alternating)"
             + (f", ours with `{a.ours_extra}`" if extra else "") + "; "
             "medians, ratios paired per round (min..max)", "",
             "| target | server | QD32 IOPS | vs kublk | QD1 mean lat (us) | vs kublk |",
             "|---|---|---|---|---|---|"]
    for pair in pairs:
        for target, server, _ in pair:
            mine = {r["round"]: r for r in rows if r["target"] == target and r["server"] == server}
            errs = [r["error"] for r in mine.values() if "error" in r]
            if errs:
                lines.append(f"| {target} | {server} | error: {errs[0]} | | | |")
                continue
            ref = {r["round"]: r for r in rows if r["target"] == target and r["server"] == "kublk"
                   and "error" not in r}
            iops = statistics.median(r["qd32_iops"] for r in mine.values())
            lat = statistics.median(r["qd1_lat_mean_us"] for r in mine.values())
            ri = [mine[k]["qd32_iops"] / ref[k]["qd32_iops"] for k in mine if k in ref]
            rl = [mine[k]["qd1_lat_mean_us"] / ref[k]["qd1_lat_mean_us"] for k in mine if k in ref]
            fmt = (lambda v: f"{statistics.median(v):.2f}x ({min(v):.2f}..{max(v):.2f})") if ri else (lambda v: "")
            lines.append(f"| {target} | {server} | {iops:.0f} | {fmt(ri)} | {lat:.1f} | {fmt(rl)} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "vs_kublk.md").write_text(text + "\n")
        (Path(a.out) / "vs_kublk.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
