"""Shared-memory zero copy (UBLK_F_SHMEM_ZC, Linux 7.1+) on the real driver.

The test functions are tests/conformance/test_sim_shmem_zc.py's, imported (not copied)
and run here with ``transport`` = a KernelTransport: REG_BUF / UNREG_BUF's refusals and
O_DIRECT I/O on /dev/ublkbN from the client's mapping of a memfd the device registered,
served in place by a Python backend and by the native loop backend.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kernel_fixtures import kt  # noqa: F401  (fixture)
from pyublk_fast import uapi

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "conformance"))
from test_sim_shmem_zc import (  # noqa: E402,F401  (collected here, run on the kernel)
    memfd,
    test_device_api_refusals,
    test_native_loop_reads_and_writes_the_shared_pages,
    test_python_backend_gets_the_shared_pages,
    test_read_only_buffer_serves_writes_in_place_and_reads_by_copy,
    test_reg_buf_refusals,
)


@pytest.fixture
def transport(kt):  # noqa: F811
    """The real driver; skipped where it lacks SHMEM_ZC (before Linux 7.1)."""
    if not kt.features() & uapi.UBLK_F_SHMEM_ZC:
        pytest.skip("the kernel lacks UBLK_F_SHMEM_ZC (Linux 7.1+)")
    return kt
