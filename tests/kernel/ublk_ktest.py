"""Helpers shared by the kernel tests (imported by conftest.py and the tests)."""
from __future__ import annotations

import re

from pyublk_fast.util import kernel_release


def kernel_series() -> tuple[int, int]:
    """(major, minor) of the running kernel, from uname -r."""
    m = re.match(r"(\d+)\.(\d+)", kernel_release())
    assert m, kernel_release()
    return int(m.group(1)), int(m.group(2))
