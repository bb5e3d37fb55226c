"""Our rbd backend on the real ublk driver against fio's own rbd engine, in one VM run.

    flock /work/vm.lock tools/vm/run -t 1500 -o /tmp/out -- \\
        python3 benchmarks/kernel/vs_rbd.py --rounds 3 --out /tmp/out

A throwaway Ceph cluster (one monitor, one memstore OSD, tools/ceph/start-cluster) starts
in the guest, on its loopback interface. Ours is `python -m pyublk_fast add -t rbd`
(/dev/ublkbN, one queue) driven by fio with libaio and O_DIRECT; the reference is fio's
rbd engine (librbd called from fio, no block device in between). Each round gives both a
fresh image of the same size holding the same bytes, and runs each point on one client
right after the other, the order alternating; both run with the same librbd settings: the
bench's RbdImage makes the images and the engine's options. Points: 4 KiB random read and
write at QD32 (IOPS), 128 KiB sequential read and write at QD32 (MiB/s), 4 KiB random read
at QD1 (mean and median latency). The table shows medians and the per-round ratios ours /
fio rbd (for latency, lower is better), and the CPU each side used per request (ours: the
server's process plus fio's; the reference: fio's, which holds librbd's threads); CPU
times under TCG are inflated, comparable only within one run. Prints a Markdown table and
writes JSON next to it.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from vs_kublk import fio_figures, need_ublk, server_pid, sh  # noqa: E402
# the points vs_nbd measures against the kernel's NBD client: (column, key, fio pattern,
# block size, queue depth, fio result field)
from vs_nbd import POINTS  # noqa: E402

from pyublk_fast.bench.refs import children_cpu  # noqa: E402
from pyublk_fast.bench.report import emit_paired, paired_cell  # noqa: E402
from pyublk_fast.bench.services import RbdImage  # noqa: E402
from pyublk_fast.util import kernel_release  # noqa: E402

IMAGE_SIZE = 64 << 20
#: the cluster's steps take far longer under the VM's emulated CPUs (as in the kernel tests)
TIMEOUT_SCALE = 10
OURS, FIO_RBD = "pyublk_fast", "fio rbd engine"

TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def thread_cpu_us(pid: int) -> dict[str, float]:
    """CPU time (user + system) process pid's threads have used so far, by thread name
    (librbd names its threads; the main thread is "main", the others of ours "queue")."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:                 # ended meanwhile
            continue
        comm, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat.rsplit(")", 1)[1].split()
        name = "main" if tid == str(pid) else "queue" if comm.startswith("python") else comm
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) * TICK_US
    return out


def fio(target: list[str], env: dict | None, rw: str, bs: str, qd: int, runtime: float,
        server: int | None) -> dict:
    """One fio job on target (a device with libaio, or the rbd engine); its result and the
    CPU per request of fio (children's rusage: every thread, librbd's too) and of server."""
    argv = ["fio", "--output-format=json", "--name=b", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={qd}", "--time_based", f"--runtime={runtime}", "--ramp_time=0.5",
            f"--size={IMAGE_SIZE}", *target]
    before = thread_cpu_us(server) if server else {}
    cpu0 = children_cpu()
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=runtime + 120)
    # fio's whole life: its start too (for the engine: librados's connect and the open)
    fio_cpu = (children_cpu() - cpu0) * 1e6
    if run.returncode or "{" not in run.stdout:
        raise RuntimeError(f"fio {shlex.join(argv[4:])}: exit {run.returncode}: "
                           f"{run.stderr.strip()[-300:]}")
    after = thread_cpu_us(server) if server else {}
    res = fio_figures(run.stdout, rw)
    ios = max(res.pop("ios"), 1)     # ramp time's requests are not counted: an upper bound
    threads = {name: (us - before.get(name, 0.0)) / ios for name, us in after.items()}
    return dict(res, fio_cpu_us=fio_cpu / ios, server_cpu_us=sum(threads.values()),
                server_threads_cpu_us=threads)


def ours(images: RbdImage, depth: int) -> tuple[list[str], int, callable]:
    """Our CLI server on a fresh image: fio's target options, the server's pid, and its
    removal. (Connecting to the cluster under TCG can outlast vs_kublk's ours_add limit.)"""
    out = sh(sys.executable, "-m", "pyublk_fast", "add", "-t", "rbd", *images.backend_args(),
             "-q", "1", "-d", str(depth), timeout=60 * TIMEOUT_SCALE)
    path = out.strip().splitlines()[-1]
    return ([f"--filename={path}", "--ioengine=libaio", "--direct=1"], server_pid(path),
            lambda: sh(sys.executable, "-m", "pyublk_fast", "del", "-n", path[len("/dev/ublkb"):],
                       timeout=60 * TIMEOUT_SCALE))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3, help="repeat every pair, alternating order")
    ap.add_argument("--depth", type=int, default=128, help="our device's queue depth")
    ap.add_argument("--points", default="",
                    help="comma-separated subset of the points' keys (default: all)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    points = [p for p in POINTS if not a.points or p[1] in a.points.split(",")]
    need_ublk("vs_rbd.py")
    os.chdir(REPO)
    workdir = tempfile.mkdtemp(prefix="vs-rbd-")
    raw = os.path.join(workdir, "image.raw")
    with open(raw, "wb") as f:          # data everywhere: reads hit objects, not holes
        for _ in range(IMAGE_SIZE >> 20):
            f.write(os.urandom(1 << 20))
    images = RbdImage(workdir, lambda kind: raw, timeout_scale=TIMEOUT_SCALE)
    if why := images.missing():
        sys.exit(why)
    if subprocess.run(["fio", "--enghelp=rbd"], capture_output=True).returncode:
        sys.exit("this fio has no rbd engine (Debian's fio has it)")
    rows = []
    try:
        for rnd in range(a.rounds):
            # both clients side by side on images of their own, each point run by one
            # right after the other, who goes first alternating: the host's load drifts
            # over seconds, and a pair taken seconds apart sees the same
            mine, ref = dict(client=OURS, round=rnd), dict(client=FIO_RBD, round=rnd)
            remove = None
            try:
                target, server, remove = ours(images, a.depth)
                sides = {OURS: (mine, target, None, server), FIO_RBD: (ref, *images.fio_target(), None)}
                for i, (_, key, rw, bs, qd, field) in enumerate(points):
                    for name in (OURS, FIO_RBD) if (rnd + i) % 2 == 0 else (FIO_RBD, OURS):
                        row, target, env, pid = sides[name]
                        res = fio(target, env, rw, bs, qd, a.runtime, pid)
                        row[key] = res[field]
                        row[f"{key}_fio_cpu_us"] = res["fio_cpu_us"]
                        row[f"{key}_server_cpu_us"] = res["server_cpu_us"]
                        row[f"{key}_server_threads_cpu_us"] = res["server_threads_cpu_us"]
                        if qd == 1:
                            row[key.replace("_mean_", "_p50_")] = res["lat_p50_us"]
            except Exception as exc:   # noqa: BLE001 - reported in the table
                mine["error"] = ref["error"] = str(exc)[:300]
            finally:
                if remove is not None:
                    remove()
            rows += [mine, ref]
    finally:
        images.close()
        shutil.rmtree(workdir, ignore_errors=True)
    emit_paired("\n".join(table(rows, points, a)), rows, a.out, "vs_rbd")
    return 0


def table(rows: list[dict], points: list, a: argparse.Namespace) -> list[str]:
    cmd = f"python3 benchmarks/kernel/vs_rbd.py {shlex.join(sys.argv[1:])}".strip()
    lines = [f"`{cmd}` in the VM (tools/vm/run): kernel {kernel_release()}, qemu TCG, "
             f"{os.cpu_count()} vCPUs, a one-monitor one-memstore-OSD Ceph cluster in the guest, "
             f"a fresh {IMAGE_SIZE >> 20} MiB image per client and round, each point's pair run "
             "back to back, the same librbd settings; "
             f"ours: one queue of depth {a.depth}, fio libaio O_DIRECT; {a.runtime:g} s per point, "
             f"{a.rounds} rounds (order alternating per point); medians, ratios ours / fio rbd paired per "
             "round (min..max)", "",
             "| client | " + " | ".join(f"{c} | vs fio rbd" for c, *_ in points) + " |",
             "|---|" + "---|---|" * len(points)]
    ref = {r["round"]: r for r in rows if r["client"] == FIO_RBD and "error" not in r}
    for name in (FIO_RBD, OURS):
        mine = {r["round"]: r for r in rows if r["client"] == name and "error" not in r}
        if not mine:
            lines.append(f"| {name} | no round completed |" + " |" * (2 * len(points) - 1))
            continue
        cells = [paired_cell(mine, ref, key) for _, key, *_ in points]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [f"\nround {r['round']} failed: {r['error']}" for r in rows
              if r["client"] == OURS and "error" in r]
    qd1 = [p for p in points if p[4] == 1]
    for name in (FIO_RBD, OURS):
        mine = [r for r in rows if r["client"] == name and "error" not in r]
        for _, key, *_ in qd1:
            if mine:
                p50 = statistics.median(r[key.replace("_mean_", "_p50_")] for r in mine)
                lines.append(f"\n{name}: 4k randread QD1 median latency {p50:.1f} us")
    lines += ["", "CPU per request (us, medians of the rounds; ours: server process + fio "
              "with libaio; fio rbd: fio with librbd's threads; fio's counts its start too, "
              "librados's connect and the image's open for the engine, which dominates at QD1)", "",
              "| client | " + " | ".join(c for c, *_ in points) + " |",
              "|---|" + "---|" * len(points)]
    for name in (FIO_RBD, OURS):
        mine = [r for r in rows if r["client"] == name and "error" not in r]
        if not mine:
            continue
        cells = []
        for _, key, *_ in points:
            fio_us = statistics.median(r[f"{key}_fio_cpu_us"] for r in mine)
            srv_us = statistics.median(r[f"{key}_server_cpu_us"] for r in mine)
            cells.append(f"{srv_us:.0f} + {fio_us:.0f}" if name == OURS else f"{fio_us:.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    mine = [r for r in rows if r["client"] == OURS and "error" not in r]
    if mine:
        lines += ["", "Our server's CPU per request by thread (us, medians of the rounds)", ""]
        for col, key, *_ in points:
            names = sorted({n for r in mine for n in r[f"{key}_server_threads_cpu_us"]})
            split = {n: statistics.median(r[f"{key}_server_threads_cpu_us"].get(n, 0.0)
                                          for r in mine) for n in names}
            lines.append(f"- {col}: " + ", ".join(f"{n} {us:.0f}" for n, us in
                                                  sorted(split.items(), key=lambda x: -x[1])
                                                  if us >= 0.5))
    return lines


if __name__ == "__main__":
    sys.exit(main())
