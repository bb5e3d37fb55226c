"""Kernel tests: they need a real ublk driver, so they run inside the VM lane.

Every test under tests/kernel gets the ``kernel`` marker.  On a host without
/dev/ublk-control they are skipped with a reason naming the runner; inside the
VM (``UBLK_VM=1``) a missing /dev/ublk-control is a failure, not a skip.
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pyublk_fast.util import kernel_release, kublk_path
from ublk_ktest import kernel_series

CONTROL = "/dev/ublk-control"
HERE = Path(__file__).resolve().parent
RUN_HINT = ("needs a real ublk driver: run `python3 tools/vm/ublk_vm.py run -- "
            "python3 -m pytest tests/kernel` (CI does)")
KUBLK_HINT = "kublk not built: run `tools/vm/build-kublk` on the host first (run-kernel-tests does)"


def in_vm() -> bool:
    """True inside the VM lane (the runner sets UBLK_VM=1)."""
    return os.environ.get("UBLK_VM") == "1"


def _driver_present() -> bool:
    if os.path.exists(CONTROL):
        return True
    if os.geteuid() == 0 and shutil.which("modprobe"):
        subprocess.run(["modprobe", "-q", "ublk_drv"], capture_output=True, check=False)
    return os.path.exists(CONTROL)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kernel: needs a real ublk driver (/dev/ublk-control); runs in the VM lane "
        "(tools/vm/ublk_vm.py run -- python3 -m pytest tests/kernel)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [it for it in items if HERE in Path(str(it.fspath)).resolve().parents]
    if not mine:
        return
    skip = None
    if not in_vm() and not _driver_present():
        skip = pytest.mark.skip(reason=RUN_HINT)
    for item in mine:
        item.add_marker(pytest.mark.kernel)
        if skip is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _require_driver(request: pytest.FixtureRequest) -> None:
    """Inside the VM a missing control device fails every kernel test."""
    if in_vm() and not os.path.exists(CONTROL):
        pytest.fail(f"{CONTROL} is missing inside the VM after `modprobe ublk_drv`: the "
                    "guest kernel's ublk driver did not load (see the console log)")


@pytest.fixture
def ctrl():
    """An open UblkControl; devices it added that the test left behind are deleted."""
    from pyublk_fast.transport.control import UblkControl

    class TrackingControl(UblkControl):
        added: set[int] = set()

        def add_dev(self, *args, **kwargs):
            info = super().add_dev(*args, **kwargs)
            self.added.add(info.dev_id)
            return info

    c = TrackingControl()
    c.added = set()
    yield c
    added = c.added
    if c.closed:
        c = TrackingControl()
    try:
        for dev_id in sorted(added):
            if os.path.exists(f"/sys/class/ublk-char/ublkc{dev_id}"):
                try:
                    c.del_dev(dev_id)
                except OSError as exc:
                    if exc.errno != errno.ENODEV:
                        raise
    finally:
        c.close()


@pytest.fixture
def kublk() -> str:
    """Path of kublk, or skip with how to build it."""
    path = kublk_path()
    if path is None and kernel_series() < (6, 15):
        pytest.skip(f"kernel {kernel_release()} predates kublk (tools/testing/selftests/"
                    "ublk, Linux 6.15+)")
    if path is None:
        pytest.skip(KUBLK_HINT)
    return path
