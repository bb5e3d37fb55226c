"""udev support for unprivileged devices: the shipped rules and the helper they run.

A new /dev/ublkcN or /dev/ublkbN is root's; an unprivileged device's owner needs both.
udev cannot ask the ublk driver who that is, so the rules (``data/70-pyublk-fast.rules``)
run ``python -m pyublk_fast udev-owner N``, which asks (GET_DEV_INFO2) and prints the
answer as ``KEY=value`` lines for ``IMPORT{program}``. ``udev-rules`` prints the rules with
the helper started by the interpreter that runs it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from . import uapi
from .transport.control import CtrlDevInfo, UblkControl

RULES_NAME = "70-pyublk-fast.rules"
RULES_PATH = Path(__file__).resolve().parent / "data" / RULES_NAME
SHIPPED_PYTHON = "/usr/bin/python3"
"""The interpreter the shipped file names (a system-wide install)."""
_HELPER = "{python} -m pyublk_fast udev-owner %n"
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
"""The directory this pyublk_fast is imported from."""


def owner_properties(info: CtrlDevInfo) -> str:
    """What ``udev-owner`` prints: the device's owner and whether it is unprivileged."""
    unprivileged = int(bool(info.flags & uapi.UBLK_F_UNPRIVILEGED_DEV))
    return (f"UBLK_UNPRIVILEGED={unprivileged}\nUBLK_OWNER_UID={info.owner_uid}\n"
            f"UBLK_OWNER_GID={info.owner_gid}\n")


def owner_of(dev_id: int) -> str:
    """``owner_properties`` of device ``dev_id``, asked of the driver (udev runs this as
    root, which may ask about any device)."""
    with UblkControl() as c:
        return owner_properties(c.get_dev_info(dev_id))


def imports_this_package(python: str) -> bool:
    """Whether ``python`` started by udev (from /, without PYTHONPATH) imports this very
    pyublk_fast, not another copy or none."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([python, "-c", "import os, pyublk_fast; "
                          "print(os.path.dirname(os.path.dirname(os.path.realpath("
                          "pyublk_fast.__file__))))"],
                         capture_output=True, text=True, cwd="/", env=env, check=False)
    return res.returncode == 0 and res.stdout.strip() == PACKAGE_ROOT


def helper_command(python: str) -> str:
    """The command line the rules run for ``python``: with PYTHONPATH naming this package's
    directory when that interpreter would not find it by itself (a checkout, a build in
    place); udev needs an absolute program, hence /usr/bin/env."""
    if " " in python or " " in PACKAGE_ROOT:
        # udev splits the command line at spaces
        raise ValueError(f"udev cannot run {python!r} with {PACKAGE_ROOT!r}: a path has a "
                         "space; install pyublk_fast for an interpreter whose path has none")
    cmd = _HELPER.format(python=python)
    if imports_this_package(python):
        return cmd
    return f"/usr/bin/env PYTHONPATH={PACKAGE_ROOT} {cmd}"


def rules_text(python: str | None = None) -> str:
    """The shipped rules, the helper started by ``python`` (default: this interpreter)."""
    shipped = RULES_PATH.read_text()
    python = python or sys.executable
    if not python:
        raise ValueError("cannot tell which interpreter runs pyublk_fast (sys.executable is "
                         "empty): run `python -m pyublk_fast udev-rules` with it")
    return shipped.replace(_HELPER.format(python=SHIPPED_PYTHON), helper_command(python))
