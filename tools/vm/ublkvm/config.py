"""Runner settings, read from ``UBLK_VM_*`` environment variables."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import LaneError

DEFAULT_CACHE = "/var/cache/pyublk-vm"
PRIMARY_SUITE = "sid"
"""Debian suite with the 7.x kernels (split into linux-binary/-modules/-base)."""
FALLBACK_SUITES = ("trixie", "bookworm-backports")
"""Suites with Debian's 6.12 kernel, tried in order when sid cannot be had."""


def parse_mem(text: str) -> int:
    """Parse a qemu-style memory size ("2G", "1536M", "512") into MiB."""
    m = re.fullmatch(r"\s*(\d+)\s*([MmGg]?)\s*", text)
    if not m:
        raise LaneError(f"UBLK_VM_MEM={text!r} is not a size like 2G or 1536M")
    n, unit = int(m.group(1)), m.group(2).upper()
    mib = n * 1024 if unit == "G" else n
    if mib < 256:
        raise LaneError(f"UBLK_VM_MEM={text!r} is too small: the guest needs at least 256M")
    return mib


@dataclass
class Settings:
    """Everything the runner needs to know, with the environment applied."""

    cache: Path = Path(DEFAULT_CACHE)
    suites: tuple[str, ...] = (PRIMARY_SUITE, *FALLBACK_SUITES)
    kver: str = ""                 # pin a kernel version, e.g. 7.2.13+deb14-amd64
    refresh: bool = False          # look for a newer kernel even when one is cached
    mirror: str = ""               # Debian mirror URI; default: the host's own
    mem_mib: int = 2048
    cpus: int = 2
    accel: str = "tcg,thread=multi"
    cpu_model: str = "max"
    append: str = ""               # extra kernel command line
    timeout: float = 900.0
    modules: tuple[str, ...] = ("ublk_drv",)

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ[str] = os.environ) -> "Settings":
        """Build settings from ``env`` (``UBLK_VM_CACHE``, ``UBLK_VM_SUITE``...)."""
        s = cls()
        s.cache = Path(env.get("UBLK_VM_CACHE") or DEFAULT_CACHE)
        suite = env.get("UBLK_VM_SUITE", "")
        if suite:
            s.suites = (suite,)
        s.kver = env.get("UBLK_VM_KVER", "")
        s.refresh = env.get("UBLK_VM_REFRESH", "") not in ("", "0")
        s.mirror = env.get("UBLK_VM_MIRROR", "")
        s.mem_mib = parse_mem(env.get("UBLK_VM_MEM", "2G"))
        cpus = env.get("UBLK_VM_CPUS", "2")
        if not cpus.isdigit() or not 1 <= int(cpus) <= 64:
            raise LaneError(f"UBLK_VM_CPUS={cpus!r}: give a number of vCPUs from 1 to 64")
        s.cpus = int(cpus)
        s.accel = env.get("UBLK_VM_ACCEL", s.accel)
        s.cpu_model = env.get("UBLK_VM_CPU", s.cpu_model)
        s.append = env.get("UBLK_VM_APPEND", "")
        if "UBLK_VM_TIMEOUT" in env:
            s.timeout = parse_timeout(env["UBLK_VM_TIMEOUT"])
        if "UBLK_VM_MODULES" in env:
            s.modules = tuple(env["UBLK_VM_MODULES"].split())
        return s

    def suite_dir(self, suite: str) -> Path:
        """Private apt state for ``suite``."""
        return self.cache / "apt" / suite

    def kernel_dir(self, kver: str) -> Path:
        """Extracted kernel ``kver``: root/, vmlinuz and initrd live here."""
        return self.cache / "kernels" / kver

    def suite_link(self, suite: str) -> Path:
        """Symlink remembering the kernel chosen from ``suite`` (no network when warm)."""
        return self.cache / f"kernel.{suite}"


def parse_timeout(text: str) -> float:
    """Parse a timeout in seconds (``90``, ``1.5``, ``15m``, ``1h``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise LaneError(f"timeout {text!r} is not a duration like 900, 90s, 15m or 1h")
    value = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if value <= 0:
        raise LaneError(f"timeout {text!r} must be positive")
    return value
