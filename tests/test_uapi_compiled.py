"""The C constants the hot path was compiled with equal pyublk_fast.uapi (checked against the header)."""
from pyublk_fast import uapi
from pyublk_fast._core.queue import COMPILED_UAPI


def test_compiled_constants_match_uapi():
    assert COMPILED_UAPI.pop("sizeof_ublksrv_io_desc") == uapi.IO_DESC_DTYPE.itemsize == 24
    assert COMPILED_UAPI.pop("sizeof_ublksrv_io_cmd") == uapi.IO_CMD_DTYPE.itemsize == 16
    assert COMPILED_UAPI.pop("sizeof_ublk_batch_io") == uapi.BATCH_IO_DTYPE.itemsize == 16
    assert COMPILED_UAPI.pop("sizeof_ublk_elem_header") == uapi.ELEM_HEADER_DTYPE.itemsize == 8
    for name, value in COMPILED_UAPI.items():
        assert getattr(uapi, name) == value, name
