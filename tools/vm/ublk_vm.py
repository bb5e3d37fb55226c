#!/usr/bin/env python3
"""Real-kernel test lane: run a command inside a qemu guest with a real ublk_drv.

The host kernel has no ublk driver; this boots a Debian kernel that has one
(sid's 7.x, falling back to Debian's 6.12) under qemu (TCG), with the host's
root shared read-only plus a tmpfs overlay, so the checkout, its in-place
built extensions and Python run unchanged in the guest, at the same paths.

  ublk_vm.py prepare                  host packages, kernel, initramfs (idempotent)
  ublk_vm.py run [-t SECS] [-o DIR] [--fail-on-warning] -- CMD [ARG...]
  ublk_vm.py info                     JSON about the prepared kernel
  ublk_vm.py apt SUITE apt-get|apt-cache ARGS...   private apt (debugging)

CMD is an argv (use `bash -c '...'` for a shell line; a pyenv shim in CMD[0] is
resolved on the host, as each shim start costs ~2.5 s in the guest); it runs as root in the
current directory with the current environment plus UBLK_VM=1, UBLK_VM_OUT,
UBLK_VM_KVER, after `modprobe ublk_drv`.  stdin is /dev/null; stdout/stderr
stream back through the serial console.  -o DIR is mounted read-write in the
guest at the same path (everything else the guest writes is lost).

Exit status: CMD's own; 124 timeout (hang); 125 guest failure (panic, oops,
boot failure, modprobe failed); 126 lane unavailable (no kernel, no qemu);
123 kernel warning with --fail-on-warning, unless it is a known upstream report
listed in tools/vm/known-kernel-reports.toml; 128+N on signal N; 2 usage.

Environment: UBLK_VM_CACHE (/var/cache/pyublk-vm), UBLK_VM_SUITE (sid, then
trixie, bookworm-backports), UBLK_VM_KVER, UBLK_VM_REFRESH=1, UBLK_VM_MIRROR
(default: the host apt's Debian mirror), UBLK_VM_MEM (2G), UBLK_VM_CPUS (2),
UBLK_VM_ACCEL (tcg,thread=multi), UBLK_VM_CPU (max), UBLK_VM_APPEND, UBLK_VM_TIMEOUT (900),
UBLK_VM_MODULES (ublk_drv).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ublkvm import (EXIT_GUEST_FAILURE, EXIT_KERNEL_WARNING,  # noqa: E402
                    EXIT_LANE_UNAVAILABLE, EXIT_TIMEOUT, LaneError)
from ublkvm import allowlist  # noqa: E402
from ublkvm.config import Settings, parse_timeout  # noqa: E402
from ublkvm.console import hang_report, kernel_message, summarize, trouble_context  # noqa: E402
from ublkvm.prepare import prepare, private_apt  # noqa: E402
from ublkvm.qemu import RunResult, install_handlers, resolve_shim, run_guest  # noqa: E402

TAIL_LINES = 40
RUN_DIR_MAX_AGE = 24 * 3600


def log(msg: str) -> None:
    """Runner messages go to stderr, prefixed, so they stand out from CMD's output."""
    print(f"ublk-vm: {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the command line (``run`` takes CMD after ``--``)."""
    p = argparse.ArgumentParser(prog="ublk_vm.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("prepare", help="install host packages, fetch the kernel, build the initrd")
    sub.add_parser("info", help="print JSON about the prepared kernel")
    r = sub.add_parser("run", help="boot the guest and run CMD")
    r.add_argument("-t", "--timeout", type=_timeout_arg, default=None,
                   help="seconds (or 15m, 1h) before the guest is killed; default 900")
    r.add_argument("-o", "--outdir", default="", help="host dir shared read-write")
    r.add_argument("--fail-on-warning", action="store_true",
                   help="exit 123 when CMD passed but the kernel warned (known upstream "
                        "reports in known-kernel-reports.toml excepted)")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    a = sub.add_parser("apt", help="apt-get/apt-cache against the private config")
    a.add_argument("suite")
    a.add_argument("args", nargs=argparse.REMAINDER)
    ns = p.parse_args(argv)
    if ns.action == "run":
        cmd = ns.cmd[1:] if ns.cmd[:1] == ["--"] else ns.cmd
        if not cmd:
            p.error("run needs a command: ublk_vm.py run [-t SECS] [-o DIR] -- CMD [ARG...]")
        ns.cmd = cmd
    if ns.action == "apt" and (not ns.args or ns.args[0] not in ("apt-get", "apt-cache")):
        p.error("apt SUITE apt-get|apt-cache ARGS...")
    return ns


def _timeout_arg(text: str) -> float:
    try:
        return parse_timeout(text)
    except LaneError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def decide_exit(res: RunResult, timeout: float, fail_on_warning: bool) -> tuple[int, str]:
    """(exit status, one-line verdict) for a finished run; verdict '' means all fine.

    ``res.trouble`` holds only the reports that are not known upstream ones.
    """
    if res.interrupted:
        return 128 + res.interrupted, f"interrupted by signal {res.interrupted}"
    if res.timed_out:
        return EXIT_TIMEOUT, f"timed out after {timeout:g}s (hang?): guest killed"
    if res.error:
        return EXIT_GUEST_FAILURE, f"guest failure: {res.error}"
    if res.status is None:
        fatal = [line for kind, line in res.trouble if kind in ("oops", "panic")]
        why = f"kernel crash: {fatal[0]}" if fatal else \
            "kernel panic, oops or boot failure (see the console tail)"
        return EXIT_GUEST_FAILURE, (f"guest failure: ended without CMD's exit status "
                                    f"(qemu status {res.qemu_rc}); {why}")
    if res.trouble:
        first = res.trouble[0][1]
        verdict = (f"kernel trouble during the run: {summarize(res.trouble)}, first "
                   f"\"{kernel_message(first) or first}\"")
        if fail_on_warning and res.status == 0:
            return EXIT_KERNEL_WARNING, (f"{verdict}: not a known upstream report in "
                                         f"{allowlist.shown()} (--fail-on-warning)")
        return res.status, verdict
    return res.status, ""


def report(res: RunResult, verdict: str, code: int, run_dir: Path,
           new_reports: list[str]) -> None:
    """Print the summary, the new kernel reports, the log around them and the console tail."""
    if not verdict:
        return
    log(verdict)
    if res.trouble:
        log(f"--- kernel reports not in {allowlist.shown()} ---")
        for line in new_reports:
            print(f"  {line}", file=sys.stderr)
        log("--- kernel log around them ---")
        for line in trouble_context(res.dmesg or "\n".join(res.tail),
                                    {line for _, line in res.trouble}):
            print(f"  {line}", file=sys.stderr)
    if res.timed_out and res.hang_dmesg:
        log("--- blocked tasks and CPU backtraces (sysrq w, l) before the timeout ---")
        for line in hang_report(res.hang_dmesg):
            print(f"  {line}", file=sys.stderr)
    if res.timed_out or res.status is None or res.error or res.trouble:
        log(f"--- guest console tail (last {TAIL_LINES} lines) ---")
        for line in res.tail[-TAIL_LINES:]:
            print(f"  {line}", file=sys.stderr)
        log(f"full console log kept in {run_dir}/console.log")
    log(f"exit status {code}")


def new_run_dir(s: Settings) -> Path:
    """A fresh per-run dir under <cache>/runs (old ones are pruned)."""
    runs = s.cache / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in runs.iterdir():
        try:
            if now - old.stat().st_mtime > RUN_DIR_MAX_AGE:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    # mkdtemp: a boot retried within the same second must not reuse the dead boot's dir
    d = Path(tempfile.mkdtemp(prefix=f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-",
                              dir=runs))
    (d / "job").mkdir()
    return d


BOOT_ATTEMPTS = 3


def boot_died(res: RunResult, jobdir: Path) -> bool:
    """True when the guest ended (not by timeout or ^C) before the job script started."""
    return (res.status is None and not res.timed_out and not res.interrupted
            and not (jobdir / "started").exists())


def cmd_run(ns: argparse.Namespace, s: Settings) -> int:
    """Boot the guest, run CMD, report; returns the exit status."""
    timeout = ns.timeout or s.timeout
    known_reports = allowlist.load()      # a broken list fails now, not after the run
    install_handlers()
    t0 = time.monotonic()
    kernel, initrd = prepare(s, log)
    outdir = ""
    if ns.outdir:
        Path(ns.outdir).mkdir(parents=True, exist_ok=True)
        outdir = str(Path(ns.outdir).resolve())
    cmd = resolve_shim(ns.cmd)
    if cmd[0] != ns.cmd[0]:
        log(f"{ns.cmd[0]} is a pyenv shim: running {cmd[0]} directly (faster under TCG)")
    for attempt in range(1, BOOT_ATTEMPTS + 1):
        run_dir = new_run_dir(s)
        log(f"booting {kernel.kver} (Debian {kernel.suite}), timeout {timeout:g}s")
        res = run_guest(s, kernel, initrd, run_dir / "job", cmd, os.getcwd(), outdir,
                        timeout, console_log=run_dir / "console.log")
        if not boot_died(res, run_dir / "job") or attempt == BOOT_ATTEMPTS:
            break
        # TCG occasionally oopses while the kernel patches its own text at boot; CMD never ran
        log(f"the guest died before CMD started (console: {run_dir / 'console.log'}); "
            f"booting again ({attempt + 1}/{BOOT_ATTEMPTS})")
    res.trouble, known = allowlist.triage(res.trouble, known_reports, kernel.kver)
    if known:
        log(f"known upstream kernel reports, allowed by {allowlist.shown()}: "
            f"{allowlist.known_summary(known)}")
        for note in allowlist.unverified(known, kernel.kver):
            log(f"note: {note}")
    code, verdict = decide_exit(res, timeout, ns.fail_on_warning)
    if outdir:
        shutil.copy(run_dir / "console.log", Path(outdir) / "ublk-vm-console.log")
        if res.dmesg:
            (Path(outdir) / "ublk-vm-dmesg.txt").write_text(res.dmesg)
    report(res, verdict, code, run_dir,
           allowlist.describe_new(res.trouble, known_reports, kernel.kver))
    log(f"guest ran {res.elapsed:.1f}s (total {time.monotonic() - t0:.1f}s), "
        f"CMD status {res.status if res.status is not None else 'none'}")
    if not verdict:
        shutil.rmtree(run_dir, ignore_errors=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        s = Settings.from_env()
        if ns.action == "prepare":
            t0 = time.monotonic()
            kernel, initrd = prepare(s, log)
            log(f"ready: {kernel.kver} (Debian {kernel.suite}) in "
                f"{time.monotonic() - t0:.1f}s; cache {s.cache}")
            return 0
        if ns.action == "info":
            kernel, initrd = prepare(s, log)
            print(json.dumps({"kver": kernel.kver, "series": kernel.series,
                              "suite": kernel.suite, "cache": str(s.cache),
                              "kernel_dir": str(kernel.dir), "vmlinuz": str(kernel.vmlinuz),
                              "initrd": str(initrd)}, indent=1))
            return 0
        if ns.action == "apt":
            s.cache.mkdir(parents=True, exist_ok=True)
            return private_apt(s, ns.suite).run_raw(ns.args)
        return cmd_run(ns, s)
    except LaneError as exc:
        log(f"error: {exc}")
        return EXIT_LANE_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
