"""Same fio jobs against kublk's and our null/loop devices, in one VM run (real ublk driver).

    tools/vm/build-kublk
    tools/vm/run -t 600 -o /tmp/out -- python3 benchmarks/kernel/vs_kublk.py --out /tmp/out

Loop devices are backed by a brd RAM disk (/dev/ram0, O_DIRECT capable) so the
backing store is the same for both servers. The "qcow2" targets put kublk's loop and
ours on a raw file, and our qcow2 backend on a fully allocated qcow2 image holding the
same bytes, both files on ext4 on a second RAM disk (/dev/ram1): what the qcow2 format
costs next to a C server on the raw data. Prints a Markdown table (per --rw pattern 4k IOPS
at each of --depths, QD32 by default, and QD1 4k mean latency; with --large, QD32 random
read and write MiB/s at those block sizes; with --counts, what each server asks of the
kernel per request at those points) and writes JSON next to it. With --direct, fio on the
RAM disk itself joins the loop rows: its "vs kublk" is how much the ublk round trip costs
a C server. Several threads on one queue (PER_IO_DAEMON): --ours-extra '--threads 2' and
--kublk-extra '--nthreads 2 --per_io_tasks' add those servers to every target.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shlex
import statistics
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# run as a script (python3 benchmarks/kernel/vs_kublk.py), the VM's Python finds this
# checkout's package only when it is on the path
sys.path.insert(0, str(REPO))

from pyublk_fast.bench.report import emit_paired, paired_cell  # noqa: E402
from pyublk_fast.util import kernel_release, kublk_path, wait_for_path  # noqa: E402

RAM = "/dev/ram0"
FILES_RAM = "/dev/ram1"          # ext4 holding the raw file and the qcow2 image
FILES_DIR = "/run/vs-kublk-files"
FILE_SIZE = 128 << 20            # fio's --size
DEPTH = 128                      # every device's queue depth


def sh(*cmd: str, timeout: float = 120, cwd: str | None = None) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stdout}{res.stderr}")
    return res.stdout


def fio(path: str, qd: int, runtime: float, rw: str = "randread", bs: str = "4k") -> dict:
    out = sh("fio", "--output-format=json", "--name=b", f"--filename={path}", f"--rw={rw}",
             f"--bs={bs}", f"--iodepth={qd}", "--ioengine=io_uring", "--direct=1", "--time_based",
             f"--runtime={runtime}", "--ramp_time=0.5", "--size=128M", timeout=runtime + 60)
    return fio_figures(out, rw)


def fio_figures(out: str, rw: str) -> dict:
    """IOPS, MiB/s and completion latency (mean, median) of fio's JSON output for one job
    of pattern rw."""
    job = json.loads(out[out.index("{"):])["jobs"][0]
    r = job["read"] if rw.endswith("read") else job["write"]
    return {"iops": r["iops"], "mib_s": r["bw_bytes"] / (1 << 20),
            "lat_mean_us": r["clat_ns"]["mean"] / 1000,
            "lat_p50_us": r["clat_ns"]["percentile"]["50.000000"] / 1000,
            "ios": r["total_ios"]}


def need_ublk(script: str) -> None:
    """Exit with one line unless a ublk driver is here (these scripts run in the VM)."""
    if not os.path.exists("/dev/ublk-control"):
        sys.exit("no ublk driver here (/dev/ublk-control): run this in the VM, as the "
                 f"docstring shows (tools/vm/run ... -- python3 benchmarks/kernel/{script})")


# --counts: what a server asks of the kernel per request, counted by perf on its process
COUNTS = {"enter": "syscalls:sys_enter_io_uring_enter", "syscalls": "raw_syscalls:sys_enter",
          "sqes": "io_uring:io_uring_submit_req", "cqes": "io_uring:io_uring_complete",
          "links": "io_uring:io_uring_link", "iowq": "io_uring:io_uring_queue_async_work",
          "csw": "context-switches", "cpu_us": "task-clock"}
SCALE = {"cpu_us": 1000.0}       # perf reports task-clock in ms


def server_pid(block_path: str) -> int:
    """The process serving /dev/ublkbN: the one holding /dev/ublkcN open."""
    char = "/dev/ublkc" + block_path[len("/dev/ublkb"):]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == char for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
        except OSError:                 # gone, or a descriptor closed meanwhile
            continue
    raise RuntimeError(f"no process holds {char} open")


def requests_done(block_path: str) -> int:
    """Reads + writes the block device has completed (its requests, as the server sees them)."""
    f = Path(f"/sys/block/{os.path.basename(block_path)}/stat").read_text().split()
    return int(f[0]) + int(f[4])


def counted(block_path: str, run: callable) -> tuple[dict, dict]:
    """run()'s result and COUNTS per request of the server's process while it ran (None
    for a device no ublk server serves: --direct's RAM disk)."""
    if not block_path.startswith("/dev/ublkb"):
        return run(), dict.fromkeys(COUNTS)
    pid = server_pid(block_path)
    out = f"/tmp/vs-kublk-perf-{pid}.txt"
    perf = subprocess.Popen(["perf", "stat", "-x,", "-o", out, "-e", ",".join(COUNTS.values()),
                             "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)                     # perf attaches to every thread first
    before = requests_done(block_path)
    res = run()
    n = max(requests_done(block_path) - before, 1)
    perf.send_signal(2)
    perf.wait(timeout=30)
    by_event = {}
    for line in Path(out).read_text().splitlines():      # value,unit,event,... (perf -x,)
        f = line.split(",")
        if len(f) > 2 and f[0].replace(".", "").isdigit():
            by_event[f[2]] = float(f[0])
    os.unlink(out)
    return res, {k: by_event[ev] * SCALE.get(k, 1.0) / n if ev in by_event else None
                 for k, ev in COUNTS.items()}


def hold_events() -> list[subprocess.Popen]:
    """Keep every event of COUNTS enabled for the whole run: each perf session would
    otherwise switch them on and off, patching kernel text, which under qemu TCG
    sometimes oopses a vCPU running that text (seen as an int3 Oops in
    trace_syscall_enter, and in __schedule for the per-task software events: a session
    on pid 1 keeps their scheduler hooks switched on)."""
    if shutil.which("perf") is None:
        sys.exit("--counts needs perf: apt-get install linux-perf on the host (the VM uses its root)")
    if not os.path.isdir("/sys/kernel/tracing/events"):
        subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"], check=False)
    tracepoints = [ev for ev in COUNTS.values() if ":" in ev]
    software = [ev for ev in COUNTS.values() if ":" not in ev]
    holds = [subprocess.Popen(["perf", "stat", *where, "-o", "/dev/null", "-e", ",".join(events)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for where, events in ((["-a"], tracepoints), (["-p", "1"], software))]
    time.sleep(2)
    for hold in holds:
        if hold.poll() is not None:
            sys.exit(f"--counts: perf cannot count {', '.join(COUNTS.values())}: {hold.stderr.read()}")
    return holds


def file_backing() -> tuple[str, str]:
    """The raw file and the qcow2 image with the same bytes, on ext4 on FILES_RAM (made once)."""
    from pyublk_fast.bench.runner import Workdir
    if not os.path.ismount(FILES_DIR):
        subprocess.run(["modprobe", "-q", "ext4"], check=False)
        sh("mkfs.ext4", "-q", "-F", FILES_RAM)
        os.makedirs(FILES_DIR, exist_ok=True)
        sh("mount", FILES_RAM, FILES_DIR)
    wd = Workdir(FILE_SIZE, base=FILES_DIR).__enter__()   # kept until the VM goes
    return wd.file("raw"), wd.file("qcow2")


def kublk_add(kublk: str, args: list[str]) -> tuple[str, callable]:
    out = sh(kublk, "add", *args)          # the kernel picks the id; kublk prints it
    found = re.search(r"^dev id (\d+):", out, re.M)
    if not found:
        raise RuntimeError(f"kublk add printed no device id: {out}")
    n = found.group(1)
    path = f"/dev/ublkb{n}"
    assert wait_for_path(path, True, 10), path
    return path, lambda: sh(kublk, "del", "-n", n)


def ours_add(args: list[str], python: str = sys.executable) -> tuple[str, callable]:
    """Our CLI server, run by `python` (another checkout's interpreter with --other, run
    outside this checkout so that it imports its own)."""
    cwd = None if python == sys.executable else "/"
    out = sh(python, "-m", "pyublk_fast", "add", *args, timeout=60, cwd=cwd)
    path = out.strip().splitlines()[-1]
    n = path[len("/dev/ublkb"):]
    return path, lambda: sh(python, "-m", "pyublk_fast", "del", "-n", n, cwd=cwd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=4.0)
    ap.add_argument("--out", default="")
    ap.add_argument("--queues", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="repeat every pair, alternating order")
    ap.add_argument("--ours-extra", action="append", default=[],
                    help="also run our server with these extra `add` options, as one more "
                    "server per target (repeatable; e.g. '--submit-chunk 32 --poll-us 50')")
    ap.add_argument("--other", action="append", default=[], metavar="LABEL=PYTHON",
                    help="also run the server of another checkout: an interpreter that imports "
                    "it (e.g. a virtualenv's python with that checkout installed), shown as "
                    "LABEL; for before/after comparisons in one boot (repeatable)")
    ap.add_argument("--targets", default="null,null -z,loop,loop -z",
                    help="comma-separated subset of: null, null -z, loop, loop -z, loop --auto_zc, "
                    "null -b, loop -b, qcow2, qcow2 -z")
    ap.add_argument("--rw", default="randread",
                    help="comma-separated fio patterns of the 4k points (e.g. randread,randwrite)")
    ap.add_argument("--depths", default="32", metavar="QDS",
                    help="comma-separated queue depths of the 4k IOPS points (default 32, at most "
                    "the devices' depth 128); the QD1 mean latency point is always there")
    ap.add_argument("--direct", action="store_true",
                    help="with the loop target, also run fio on the RAM disk itself (no ublk): "
                    "what any ublk server costs, C or ours")
    ap.add_argument("--kublk-extra", action="append", default=[],
                    help="also run kublk with these extra `add` options, as one more server "
                    "per target (repeatable; e.g. '--nthreads 2 --per_io_tasks')")
    ap.add_argument("--large", default="", metavar="SIZES",
                    help="comma-separated block sizes (e.g. 128k,1m): also QD32 random read and "
                    "write bandwidth at each, in a second table")
    ap.add_argument("--counts", action="store_true",
                    help="also count, per request, each server's io_uring_enter calls, all "
                    "syscalls, SQEs, CQEs, linked SQEs, io-wq punts, context switches and CPU "
                    "time (perf on the server's process) at every point, in a second table; "
                    "the IOPS and MiB/s are then those of the traced runs")
    ap.add_argument("--no-4k", dest="small", action="store_false",
                    help="skip the 4k points (QD32 IOPS, QD1 latency): only --large")
    a = ap.parse_args()
    large = [b.strip() for b in a.large.split(",") if b.strip()]
    try:
        depths = [int(d) for d in a.depths.split(",") if d.strip()]
    except ValueError:
        depths = []
    if not depths or not all(1 <= d <= DEPTH for d in depths):
        sys.exit(f"--depths {a.depths!r}: give queue depths from 1 to {DEPTH}, comma-separated")
    if not a.small and not large:
        sys.exit("--no-4k leaves nothing to measure: give --large too")
    need_ublk("vs_kublk.py")
    kublk = kublk_path()
    if kublk is None:
        sys.exit("kublk not built: run tools/vm/build-kublk on the host first")
    os.chdir(REPO)
    subprocess.run(["modprobe", "brd", "rd_nr=2", "rd_size=393216"], check=False)
    q = str(a.queues)
    shape = ["-q", q, "-d", str(DEPTH)]
    # target -> (kublk's args, our args): same backing store, same shape (kublk's requests
    # are up to 1 MiB: its max_io_buf_bytes)
    specs = {"null": (["-t", "null"], ["-t", "null", "--max-io", "1M"]),
             "null -z": (["-t", "null", "-z"], ["-t", "null", "-z", "--max-io", "1M"]),
             "loop": (["-t", "loop", RAM], ["-t", "loop", "-f", RAM, "--max-io", "1M"]),
             "loop -z": (["-t", "loop", "-z", RAM], ["-t", "loop", "-z", "-f", RAM, "--max-io", "1M"]),
             # zero copy by the same mechanism on both sides: kublk -z registers each request's
             # buffer with linked REGISTER/UNREGISTER_IO_BUF, while our -z takes AUTO_BUF_REG
             # (6.16+), which kublk uses only with --auto_zc
             "loop --auto_zc": (["-t", "loop", "--auto_zc", RAM],
                                ["-t", "loop", "-z", "-f", RAM, "--max-io", "1M"]),
             # BATCH_IO (7.0): kublk -b against ours with --batch-io
             "null -b": (["-t", "null", "-b"], ["-t", "null", "--batch-io", "--max-io", "1M"]),
             "loop -b": (["-t", "loop", "-b", RAM], ["-t", "loop", "--batch-io", "-f", RAM,
                                                     "--max-io", "1M"])}
    targets = [t.strip() for t in a.targets.split(",")]
    rws = [r.strip() for r in a.rw.split(",") if r.strip()]
    if any(t.startswith("qcow2") for t in targets):
        raw, image = file_backing()
        for z in ([], ["-z"]):
            specs[" ".join(["qcow2", *z])] = (["-t", "loop", *z, raw],
                                              ["-t", "loop", *z, "-f", raw, "--max-io", "1M"])
    unknown = [t for t in targets if t not in specs]
    if unknown:
        sys.exit(f"--targets: unknown {unknown}; choose from {list(specs)} (and qcow2, qcow2 -z)")
    ours_variants = [("pyublk_fast", [], sys.executable)] + [
        (f"pyublk_fast {x}", shlex.split(x), sys.executable) for x in a.ours_extra]
    for other in a.other:
        label, sep, python = other.partition("=")
        if not sep or not os.access(python, os.X_OK):
            sys.exit(f"--other {other!r}: give LABEL=PYTHON with an executable interpreter")
        ours_variants.append((label, [], python))
    groups = []          # per target: kublk first, then each of our variants
    for t in targets:
        kargs, oargs = specs[t]
        group = [(t, "kublk" + (f" {x}" if x else ""),
                  lambda k=kargs, e=shlex.split(x): kublk_add(kublk, [*k[:2], *shape, *e, *k[2:]]))
                 for x in ["", *a.kublk_extra]]
        for name, extra, python in ours_variants:
            group.append((t, name, lambda o=oargs, e=extra, p=python: ours_add([*o, *shape, *e], p)))
        if a.direct and t == "loop":
            group.append((t, f"fio on {RAM} (no ublk)", lambda: (RAM, lambda: None)))
        if t.startswith("qcow2"):
            # the group's kublk and our loop serve the raw file; this row the same bytes as qcow2
            qargs = ["-t", "qcow2", *(["-z"] if t.endswith("-z") else []), "-f", image, "--max-io", "1M"]
            group.append((t, "pyublk_fast qcow2", lambda o=qargs: ours_add([*o, *shape])))
        groups.append(group)
    rows = []
    holds = hold_events() if a.counts else []
    for rnd in range(a.rounds):
        for group in groups:
            # alternate who goes first, so drift in a noisy VM hits all servers alike
            for target, server, add in (group if rnd % 2 == 0 else group[::-1]):
                row = dict(target=target, server=server, round=rnd)
                try:
                    path, remove = add()
                except Exception as exc:   # noqa: BLE001 - reported in the table
                    rows.append(dict(row, error=str(exc)[:200]))
                    continue

                def measure(key: str, *args) -> dict:
                    """One fio point; with --counts, its per-request counts go in the row."""
                    point = functools.partial(fio, path, *args)
                    if not a.counts:
                        return point()
                    r, per_req = counted(path, point)
                    row.update({f"{key}_{k}_per_req": v for k, v in per_req.items()})
                    return r
                try:
                    for rw in rws if a.small else ():
                        by_qd = {qd: measure(f"{rw}_qd{qd}", qd, a.runtime, rw) for qd in depths}
                        qd1 = by_qd.get(1) or measure(f"{rw}_qd1", 1, a.runtime, rw)
                        row.update({f"{rw}_qd{qd}_iops": r["iops"] for qd, r in by_qd.items()})
                        row.update({f"{rw}_qd1_lat_mean_us": qd1["lat_mean_us"],
                                    f"{rw}_qd1_lat_p50_us": qd1["lat_p50_us"]})
                    for bs in large:
                        for rw in ("randread", "randwrite"):
                            r = measure(f"{rw}_{bs}", 32, a.runtime, rw, bs)
                            row[f"{rw}_{bs}_mib_s"] = r["mib_s"]
                    rows.append(row)
                finally:
                    remove()
                time.sleep(0.2)
    lines = [f"kernel {kernel_release()}, qemu TCG, {os.cpu_count()} vCPUs, {a.runtime:g} s per "
             f"point, queues {q}, {a.rounds} rounds (order alternating); medians, ratios paired "
             "per round (min..max)", ""]
    cols = [c for rw in (rws if a.small else ())
            for c in [(f"4k {rw} QD{qd} IOPS", f"{rw}_qd{qd}_iops") for qd in depths]
            + [(f"4k {rw} QD1 mean lat (us)", f"{rw}_qd1_lat_mean_us")]]
    cols += [(f"{bs} {rw} QD32 MiB/s", f"{rw}_{bs}_mib_s") for bs in large for rw in ("randread", "randwrite")]
    lines += ["| target | server | " + " | ".join(f"{c} | vs kublk" for c, _ in cols) + " |",
              "|---|---|" + "---|---|" * len(cols)]
    for group in groups:
        for target, server, _ in group:
            mine = {r["round"]: r for r in rows if r["target"] == target and r["server"] == server}
            errs = [r["error"] for r in mine.values() if "error" in r]
            if errs:
                lines.append(f"| {target} | {server} | error: {errs[0]} |" + " |" * (2 * len(cols) - 1))
                continue
            ref = {r["round"]: r for r in rows if r["target"] == target and r["server"] == "kublk"
                   and "error" not in r}
            cells = [paired_cell(mine, ref, key) for _, key in cols]
            lines.append(f"| {target} | {server} | " + " | ".join(cells) + " |")
    for hold in holds:
        hold.send_signal(2)
        hold.wait(timeout=30)
    if holds:
        lines += ["", "Per request, medians of the rounds (perf on each server's process while fio ran; "
                  "requests counted by the block device): " + ", ".join(
                      f"{k} = {ev}" + (" (us, polling included)" if k == "cpu_us" else "")
                      for k, ev in COUNTS.items()), "",
                  "| target | server | point | " + " | ".join(COUNTS) + " |",
                  "|---|---|---|" + "---|" * len(COUNTS)]
        points = [(f"4k {rw} QD{qd}", f"{rw}_qd{qd}") for rw in (rws if a.small else ())
                  for qd in sorted({1, *depths})]
        points += [(f"{bs} {rw}", f"{rw}_{bs}") for bs in large for rw in ("randread", "randwrite")]
        for group in groups:
            for target, server, _ in group:
                mine = [r for r in rows if r["target"] == target and r["server"] == server
                        and "error" not in r]
                for label, key in points if mine else ():
                    got = {k: [r[f"{key}_{k}_per_req"] for r in mine
                                   if r[f"{key}_{k}_per_req"] is not None] for k in COUNTS}
                    cells = [f"{statistics.median(v):.2f}" if v else "n/a" for v in got.values()]
                    lines.append(f"| {target} | {server} | {label} | " + " | ".join(cells) + " |")
    emit_paired("\n".join(lines), rows, a.out, "vs_kublk")
    return 0


if __name__ == "__main__":
    sys.exit(main())
