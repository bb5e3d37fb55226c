"""Request limits on a real kernel: fio's crc32c verify on a loop device whose backend
declares kublk null's limits (4 KiB DMA alignment, 32 segments of at most 32 KiB), on the
copy and zero-copy paths. What the queue shows and what the driver refuses are checked on
both transports by tests/conformance/test_sim_params.py."""
from __future__ import annotations

import pytest

from kernel_fixtures import fio, fio_verify_args, kt, make_backend  # noqa: F401
from pyublk_fast import uapi
from pyublk_fast.device import Device


@pytest.mark.parametrize("data_path", ["copy", "zero_copy"])
def test_loop_with_limits_serves_fio_verify(kt, tmp_path, data_path):  # noqa: F811
    if data_path == "zero_copy" and not kt.features() & uapi.UBLK_F_AUTO_BUF_REG:
        pytest.skip("zero copy by AUTO_BUF_REG needs Linux 6.16+")
    backend, native = make_backend("loop", tmp_path)
    backend.dma_alignment, backend.max_segments, backend.max_segment_size = 4096, 32, 32 * 1024
    with Device(backend, kt, depth=32, data_path=data_path, native=native) as dev:
        queue = f"/sys/block/ublkb{dev.dev_id}/queue"
        shown = {name: int(open(f"{queue}/{name}").read())
                 for name in ("dma_alignment", "max_segments", "max_segment_size")}
        assert shown == dict(dma_alignment=4095, max_segments=32, max_segment_size=32768)
        out = fio(*fio_verify_args(kt.block_path(dev.dev_id)))
        assert all(j["write"]["io_bytes"] > 0 and j["read"]["io_bytes"] > 0 for j in out["jobs"])
        assert dev.requests_served > 0
