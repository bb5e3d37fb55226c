"""The Device-level conformance suite on a real ublk driver.

The test functions are tests/conformance/test_sim_protocol.py's and
test_sim_params.py's, imported (not copied) and collected here with ``transport`` =
a KernelTransport: the same checks of tags, queues, several devices, front errors,
server death, in-process kill() + recover() (recovery fail / reissue / fail_io), stop
with I/O in flight and request limits. A check the kernel cannot take is skipped in KERNEL_SKIPS, with why.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from kernel_fixtures import kt  # noqa: F401  (fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "conformance"))
from test_sim_protocol import (  # noqa: E402,F401  (collected here, run on the kernel)
    test_bad_device_args,
    test_commands_out_of_turn_get_the_drivers_errors,
    test_kill_with_recovery_fail_io_fails_new_io_until_recover,
    test_kill_with_recovery_fail_new_io_waits_for_recover,
    test_kill_with_reissue_completes_everything_after_recover,
    test_kill_without_recovery_fails_in_flight,
    test_many_in_flight_more_than_tags,
    test_misaligned_and_out_of_range_requests,
    test_open_device_before_start_and_after_stop,
    test_open_device_not_started,
    test_several_devices_in_one_transport,
    test_stop_with_io_in_flight_never_hangs,
    test_tag_reuse_loadgen_qd64_on_depth8,
    test_two_queues,
)

from test_sim_params import (  # noqa: E402,F401  (collected here, run on the kernel)
    test_declared_limits_reach_the_block_queue,
    test_request_limits_refused_as_the_kernel_does,
    test_requests_respect_max_segments,
)

#: test node name (or function name) -> why it cannot run on this kernel; evaluated per test.
KERNEL_SKIPS = {
    "test_two_queues": lambda: (os.cpu_count() or 1) < 2 and
    f"the kernel caps hardware queues at the CPU count ({os.cpu_count()}); run the VM "
    "with UBLK_VM_CPUS=2 or more",
}


@pytest.fixture
def transport(request, kt):  # noqa: F811
    """The real driver (KernelTransport); devices the test leaves behind are deleted."""
    for key in (request.node.name, request.node.originalname):
        why = KERNEL_SKIPS.get(key, lambda: None)()
        if why:
            pytest.skip(why)
    return kt
