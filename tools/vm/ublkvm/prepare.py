"""``prepare``: host packages, a kernel with ublk_drv, and the initramfs."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import LaneError, hostpkgs
from .apt import PrivateApt, host_debian_source
from .config import PRIMARY_SUITE, Settings
from .initramfs import ensure_initramfs
from .kernel import KERNEL_NAME_PATTERN, Kernel, choose_kernel, unpack


@contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """One prepare at a time per cache directory."""
    with open(cache / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def private_apt(s: Settings, suite: str) -> PrivateApt:
    """The private apt for ``suite`` on the host's Debian mirror (or UBLK_VM_MIRROR)."""
    if s.mirror:
        return PrivateApt(s.suite_dir(suite), suite, s.mirror)
    src = host_debian_source()
    return PrivateApt(s.suite_dir(suite), suite, src.uri, src.signed_by)


def cached_kernel(s: Settings, log) -> Kernel | None:
    """A kernel chosen before (per suite link, in suite order): no network needed."""
    if s.kver:
        kdir = s.kernel_dir(s.kver)
        return Kernel.load(kdir) if (kdir / ".ready").exists() else None
    if s.refresh:
        return None
    for suite in s.suites:
        link = s.suite_link(suite)
        if link.is_symlink() and (link / ".ready").exists():
            kernel = Kernel.load(link.resolve())
            if suite != s.suites[0]:
                log(f"using the cached fallback kernel {kernel.kver} from Debian {suite}; "
                    f"UBLK_VM_REFRESH=1 looks for a {s.suites[0]} kernel again")
            return kernel
    return None


def fetch_kernel(s: Settings, log) -> Kernel:
    """Find and unpack the newest kernel of the first suite that has one."""
    failures = []
    for i, suite in enumerate(s.suites):
        try:
            apt = private_apt(s, suite)
            choice = choose_kernel(apt.package_names(KERNEL_NAME_PATTERN), s.kver)
            if choice is None:
                want = s.kver or "any generic amd64 kernel"
                raise LaneError(f"no package for {want} in Debian {suite}")
            kdir = s.kernel_dir(choice.kver)
            kernel = (Kernel.load(kdir) if (kdir / ".ready").exists()
                      else unpack(apt, choice, kdir, log))
        except LaneError as exc:
            failures.append((suite, str(exc)))
            if i + 1 < len(s.suites):
                what = "kernel 7.x" if suite == PRIMARY_SUITE else "a kernel"
                log(f"{what} from Debian {suite} cannot be had: {exc}")
                log(f"falling back to Debian {s.suites[i + 1]} (kernel 6.12: no zero copy, "
                    "AUTO_BUF_REG, BATCH_IO; kernel tests adapt to its features)")
            continue
        link = s.suite_link(suite)
        if not s.kver:
            tmp = link.with_name(link.name + ".tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(Path("kernels") / kernel.kver)
            tmp.replace(link)
        return kernel
    detail = "\n".join(f"  - Debian {suite}: {why}" for suite, why in failures)
    raise LaneError("no kernel with ublk_drv could be had:\n" + detail +
                    "\nCheck that the host reaches its Debian mirror (see /etc/apt/sources.list"
                    "(.d)), or set UBLK_VM_MIRROR / UBLK_VM_SUITE / UBLK_VM_KVER.")


def prepare(s: Settings, log) -> tuple[Kernel, Path]:
    """Make sure host packages, kernel and initramfs are there; (kernel, initrd)."""
    if os.geteuid() != 0:
        raise LaneError("the VM runner must run as root (apt, 9p passthrough of /)")
    s.cache.mkdir(parents=True, exist_ok=True)
    s.cache = s.cache.resolve()          # the guest sees host paths: no relative ones
    with cache_lock(s.cache):
        hostpkgs.ensure(hostpkgs.HOST_PACKAGES, log)
        kernel = cached_kernel(s, log) or fetch_kernel(s, log)
        initrd = ensure_initramfs(kernel, log)
        current = s.cache / "current"
        tmp = s.cache / "current.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path("kernels") / kernel.kver)
        tmp.replace(current)
    return kernel, initrd
