"""PER_IO_DAEMON on a real ublk driver: tests/conformance/test_per_io_daemon.py's checks
(imported, not copied) with ``transport`` = a KernelTransport, and fio crc32c verify
through a queue served by two threads."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kernel_fixtures import fio, fio_verify_args, kt, make_backend, skip_unless_kernel_has  # noqa: F401
from pyublk_fast import uapi
from pyublk_fast.device import Device

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "conformance"))
from test_per_io_daemon import (  # noqa: E402,F401  (collected here, run on the kernel)
    test_add_dev_grants_per_io_daemon_unasked,
    test_another_threads_commit_is_refused,
    test_bad_thread_counts_are_refused,
    test_threads_kill_and_recover_reissues_everything,
    test_threads_quiesce_hands_over,
    test_threads_serve_data,
)


@pytest.fixture
def transport(kt):  # noqa: F811
    return kt


@pytest.mark.parametrize("kind,data_path", [("loop", "copy"), ("loop", "zero_copy"),
                                            ("loop", "user_copy"), ("memory", "copy")])
def test_fio_verify_two_threads_per_queue(kt, tmp_path, kind, data_path):  # noqa: F811
    """fio's crc32c verify through one queue of two threads: every byte written comes
    back, and each thread served some of it."""
    skip_unless_kernel_has(kt, uapi.UBLK_F_PER_IO_DAEMON, "PER_IO_DAEMON")
    backend, native = make_backend(kind, tmp_path)
    with Device(backend, kt, queues=1, depth=32, data_path=data_path, native=native,
                threads_per_queue=2) as dev:
        out = fio(*fio_verify_args(kt.block_path(dev.dev_id)))
        assert all(j["write"]["io_bytes"] > 0 and j["read"]["io_bytes"] > 0 for j in out["jobs"])
        per_thread = [q.requests for q in dev._queues]
        assert len(per_thread) == 2 and min(per_thread) > 0, per_thread
