"""Host packages the lane needs, installed from the host's own apt when missing."""
from __future__ import annotations

import os
import subprocess

from . import LaneError

HOST_PACKAGES = ("qemu-system-x86", "busybox-static", "kmod", "fio", "zstd", "udev", "nbdkit",
                 "nbd-client")
"""qemu (TCG guest), static busybox (initramfs), kmod (depmod on the host, modprobe
in the guest), fio (kernel tests), zstd (for .ko.zst modules), udev (systemd-udevd and
udevadm: the unprivileged-device tests run them in the guest with the shipped rules),
nbdkit (the nbd backend's tests serve its memory plugin in the guest), nbd-client (the
kernel's own NBD client, which benchmarks/kernel/vs_nbd.py compares the nbd backend with)."""
BUILD_PACKAGES = ("gcc", "libc6-dev")
"""Needed by build-kublk only."""


def missing(packages: tuple[str, ...]) -> list[str]:
    """Those of ``packages`` dpkg does not list as installed."""
    res = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\n",
                          *packages], capture_output=True, text=True, check=False)
    installed = {line.split()[0] for line in res.stdout.splitlines()
                 if len(line.split()) > 1 and line.split()[1].startswith("ii")}
    return [p for p in packages if p not in installed]


def ensure(packages: tuple[str, ...], log) -> None:
    """apt-get install whatever of ``packages`` is missing (LaneError on failure)."""
    need = missing(packages)
    if not need:
        return
    if os.geteuid() != 0:
        raise LaneError(f"host packages missing: {' '.join(need)}; install them as root "
                        f"(apt-get install {' '.join(need)})")
    log(f"installing host packages: {' '.join(need)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *need]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:   # stale or missing package lists: refresh once
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-8:])
        raise LaneError(f"apt-get install {' '.join(need)} failed:\n{tail}")
