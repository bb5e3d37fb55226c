"""Pick, fetch and unpack a Debian kernel that ships ublk_drv (never installed).

Kernel 7.x is split into ``linux-binary-<kver>`` (vmlinuz under
/usr/lib/modules/<kver>/), ``linux-modules-<kver>`` and ``linux-base-<kver>``;
6.12 ships one ``linux-image-<kver>``.  Everything is unpacked with
``dpkg-deb -x`` into ``<cache>/kernels/<kver>/root`` and ``depmod -b`` is run
there so the guest's modprobe finds ``ublk_drv``.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import LaneError
from .apt import PrivateApt

KERNEL_PACKAGE_RE = re.compile(r"^linux-(binary|image)-(\d[^ ]*)-amd64$")
KERNEL_NAME_PATTERN = r"^linux-(binary|image|base)-[0-9].*-amd64$"
"""apt-cache search pattern for the names :func:`choose_kernel` needs."""
EXCLUDED_FLAVOURS = ("-rt", "-cloud")
READY = ".ready"


def version_key(version: str) -> tuple:
    """Sort key for kernel versions: numbers numerically, words alphabetically.

    ``~`` (Debian's "before") sorts before anything, so 7.3~rc1 < 7.3.
    """
    key = []
    for tok in re.findall(r"\d+|[A-Za-z]+|~", version):
        if tok == "~":
            key.append((-2, 0, ""))
        elif tok.isdigit():
            key.append((1, int(tok), ""))
        else:
            key.append((0, 0, tok))
    key.append((-1, 0, ""))        # end of string: after "~", before anything else
    return tuple(key)


@dataclass(frozen=True)
class KernelChoice:
    """A kernel version and the packages that make it up."""

    kver: str
    packages: tuple[str, ...]


def choose_kernel(names: list[str], pinned: str = "") -> KernelChoice | None:
    """The newest generic amd64 kernel among package ``names`` (or ``pinned``).

    A version with ``linux-binary-<kver>`` uses the 7.x split
    (binary + modules + base, base only when listed); otherwise
    ``linux-image-<kver>``.
    """
    kinds: dict[str, set[str]] = {}
    for name in names:
        m = KERNEL_PACKAGE_RE.match(name)
        if not m:
            continue
        kind, ver = m.group(1), m.group(2)
        if ver.endswith(EXCLUDED_FLAVOURS):
            continue
        kinds.setdefault(f"{ver}-amd64", set()).add(kind)
    if pinned:
        if pinned not in kinds:
            return None
        kver = pinned
    elif kinds:
        kver = max(kinds, key=version_key)
    else:
        return None
    if "binary" in kinds[kver]:
        pkgs = [f"linux-binary-{kver}", f"linux-modules-{kver}"]
        if f"linux-base-{kver}" in names:
            pkgs.append(f"linux-base-{kver}")
    else:
        pkgs = [f"linux-image-{kver}"]
    return KernelChoice(kver, tuple(pkgs))


@dataclass(frozen=True)
class Kernel:
    """An unpacked kernel in the cache."""

    kver: str
    dir: Path          # <cache>/kernels/<kver>
    vmlinuz: Path
    moddir: Path       # <dir>/root/usr/lib/modules/<kver>
    suite: str
    series: str        # "7.2"

    @classmethod
    def load(cls, kdir: Path) -> "Kernel":
        """Read a kernel unpacked by :func:`unpack` (LaneError when incomplete)."""
        try:
            info = json.loads((kdir / READY).read_text())
        except (OSError, ValueError) as exc:
            raise LaneError(f"kernel cache {kdir} is incomplete ({exc}); "
                            "run `ublk_vm.py prepare` again") from exc
        return cls(info["kver"], kdir, kdir / info["vmlinuz"], kdir / info["moddir"],
                   info["suite"], series_of(info["kver"]))


def series_of(kver: str) -> str:
    """'7.2.13+deb14-amd64' -> '7.2'."""
    m = re.match(r"(\d+)\.(\d+)", kver)
    return f"{m.group(1)}.{m.group(2)}" if m else kver


def find_ublk_module(moddir: Path) -> str:
    """How ublk_drv is present: 'module', 'builtin', or '' when missing."""
    if list((moddir / "kernel").rglob("ublk_drv.ko*")):
        return "module"
    builtin = moddir / "modules.builtin"
    if builtin.exists() and "/ublk_drv.ko" in builtin.read_text():
        return "builtin"
    return ""


def unpack(apt: PrivateApt, choice: KernelChoice, kdir: Path, log) -> Kernel:
    """Download ``choice`` and unpack it into ``kdir`` (replacing what was there)."""
    kver = choice.kver
    log(f"downloading {' '.join(choice.packages)} (Debian {apt.suite})")
    shutil.rmtree(kdir, ignore_errors=True)
    root = kdir / "root"
    root.mkdir(parents=True)
    debs = apt.download(list(choice.packages), kdir / "debs")
    for deb in debs:
        res = subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], capture_output=True,
                             text=True, check=False)
        if res.returncode != 0:
            raise LaneError(f"dpkg-deb -x {deb.name} failed: {res.stderr.strip()}")
    shutil.rmtree(kdir / "debs")
    moddir = next((p for p in (root / "usr/lib/modules" / kver, root / "lib/modules" / kver)
                   if p.is_dir() and not p.is_symlink()), None)
    if moddir is None:
        raise LaneError(f"the packages for {kver} have no modules directory")
    if not (root / "lib").exists():
        (root / "lib").symlink_to("usr/lib")     # depmod -b wants <base>/lib/modules
    vmlinuz = next((p for p in (moddir / "vmlinuz", root / "boot" / f"vmlinuz-{kver}")
                    if p.is_file()), None)
    if vmlinuz is None:
        raise LaneError(f"the packages for {kver} have no vmlinuz")
    res = subprocess.run(["depmod", "-b", str(root), kver], capture_output=True, text=True,
                         check=False)
    if res.returncode != 0:
        raise LaneError(f"depmod -b {root} {kver} failed: {res.stderr.strip()}")
    if not find_ublk_module(moddir):
        raise LaneError(f"kernel {kver} has no ublk_drv (CONFIG_BLK_DEV_UBLK unset)")
    info = {"kver": kver, "suite": apt.suite, "packages": list(choice.packages),
            "vmlinuz": str(vmlinuz.relative_to(kdir)), "moddir": str(moddir.relative_to(kdir))}
    (kdir / READY).write_text(json.dumps(info, indent=1) + "\n")
    log(f"kernel {kver} ready in {kdir}")
    return Kernel.load(kdir)
