"""BATCH_IO on a real ublk driver: tests/conformance/test_batch_io.py's checks (imported,
not copied) with ``transport`` = a KernelTransport, and fio crc32c verify on the batch path."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kernel_fixtures import fio, fio_verify_args, kt, make_backend  # noqa: F401
from pyublk_fast import uapi
from pyublk_fast.device import Device

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "conformance"))
from test_batch_io import (  # noqa: E402,F401  (collected here, run on the kernel)
    raw,
    test_add_dev_grants_batch_io_without_need_get_data,
    test_batch_commands_refused_without_batch_io,
    test_batch_header_checks,
    test_batch_io_costs_no_more_than_per_tag_at_depth_1,
    test_batch_io_kill_and_recover_reissues_everything,
    test_batch_io_quiesce_hands_over,
    test_batch_io_refuses_paths_it_does_not_serve,
    test_batch_io_serves_data,
    test_batch_io_stop_with_io_in_flight,
    test_per_tag_commands_refused_on_a_batch_device,
    test_prep_is_all_or_nothing_and_only_once,
    test_single_commit_is_answered_when_refused,
    test_user_copy_batches_carry_no_buffer,
)


@pytest.fixture
def transport(kt):  # noqa: F811
    return kt


@pytest.mark.parametrize("kind,data_path", [("null", "copy"), ("loop", "copy"), ("loop", "user_copy"),
                                            ("memory", "copy")])
def test_fio_verify_batch_io(kt, tmp_path, kind, data_path):  # noqa: F811
    if not kt.features() & uapi.UBLK_F_BATCH_IO:
        pytest.skip("the kernel lacks BATCH_IO (Linux 7.0)")
    backend, native = make_backend(kind, tmp_path, *([1 << 30] if kind == "null" else []))
    with Device(backend, kt, queues=2, depth=32, data_path=data_path, native=native, batch_io=True) as dev:
        assert dev.flags & uapi.UBLK_F_BATCH_IO
        if kind == "null":       # nothing to verify: every byte must still travel
            out = fio("--name=null", f"--filename={kt.block_path(dev.dev_id)}", "--rw=randrw",
                      "--bs=64k", "--iodepth=32", "--ioengine=io_uring", "--direct=1", "--size=32M")
            job = out["jobs"][0]
            assert job["read"]["io_bytes"] + job["write"]["io_bytes"] == 32 << 20
        else:
            out = fio(*fio_verify_args(kt.block_path(dev.dev_id)))
            assert all(j["write"]["io_bytes"] > 0 and j["read"]["io_bytes"] > 0 for j in out["jobs"])
        assert dev.requests_served > 0
