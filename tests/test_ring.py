"""Ring against the real kernel io_uring: every opcode we prep, registration, errors."""
import errno
import os
import threading

import pytest

from pyublk_fast._core.ring import (
    SETUP_COOP_TASKRUN,
    SETUP_DEFER_TASKRUN,
    SETUP_SINGLE_ISSUER,
    SETUP_SQE128,
    SQE_CQE_SKIP_SUCCESS,
    SQE_IO_LINK,
    Ring,
    RingFullError,
)
from pyublk_fast.util import wait_until

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
U64_MAX = 2**64 - 1


@pytest.fixture
def ring():
    with Ring(16) as r:
        yield r


@pytest.fixture
def datafile(tmp_path):
    fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o600)
    yield fd
    os.close(fd)


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(n))


def one(r: Ring, timeout: float = 5.0) -> tuple:
    (cqe,) = r.completions(1, timeout)
    return cqe


# -- data-carrying operations -------------------------------------------------------------

@pytest.mark.parametrize("ud", [0, 1, 0x1234_5678_9ABC_DEF0, 2**63, U64_MAX])
def test_nop_round_trips_user_data(ring, ud):
    ring.prep_nop(ud)
    assert ring.submit() == 1
    assert one(ring) == (ud, 0, 0)


def test_user_data_out_of_range_is_rejected(ring):
    with pytest.raises(OverflowError):
        ring.prep_nop(2**64)
    with pytest.raises(OverflowError):
        ring.prep_nop(-1)
    assert ring.sq_space_left() == ring.sq_entries


@pytest.fixture
def devnull():
    fd = os.open("/dev/null", os.O_RDWR)
    yield fd
    os.close(fd)


@pytest.mark.parametrize("flags,size", [(0, 16), (SETUP_SQE128, 80)])
def test_uring_cmd_on_devnull(devnull, flags, size):
    with Ring(4, flags) as r:
        assert bool(r.setup_flags & SETUP_SQE128) == bool(flags)
        r.prep_uring_cmd(devnull, 0x1234, pattern(size), 42)
        r.prep_uring_cmd(devnull, 0, None, 43)
        r.prep_uring_cmd(devnull, 0, b"", 44)
        assert r.completions(3, 5.0) == [(42, 0, 0), (43, 0, 0), (44, 0, 0)]


@pytest.mark.parametrize("flags,size", [(0, 17), (SETUP_SQE128, 81)])
def test_uring_cmd_payload_too_big(devnull, flags, size):
    with Ring(4, flags) as r:
        with pytest.raises(ValueError, match=f"payload of {size} bytes"):
            r.prep_uring_cmd(devnull, 0, bytes(size), 1)
        assert r.sq_space_left() == r.sq_entries  # nothing half-prepared


def test_uring_cmd_negative_fd(ring):
    with pytest.raises(ValueError, match="invalid fd -1"):
        ring.prep_uring_cmd(-1, 0, b"", 1)
    assert ring.sq_space_left() == ring.sq_entries


def test_write_fsync_read(ring, datafile):
    data = pattern(8192, seed=7)
    ring.prep_write(datafile, data, 4096, 1, SQE_IO_LINK)
    ring.prep_fsync(datafile, 2, datasync=True)
    assert ring.completions(2, 5.0) == [(1, 8192, 0), (2, 0, 0)]
    assert os.pread(datafile, 8192, 4096) == data
    buf = bytearray(8192 + 100)
    ring.prep_read(datafile, memoryview(buf)[50:50 + 8192], 4096, 3)
    assert one(ring) == (3, 8192, 0)
    assert buf[50:50 + 8192] == data and buf[:50] == bytes(50) and buf[-50:] == bytes(50)
    ring.prep_fsync(datafile, 4)
    assert one(ring) == (4, 0, 0)


def test_short_read_at_eof(ring, datafile):
    os.pwrite(datafile, b"abc", 0)
    buf = bytearray(4096)
    ring.prep_read(datafile, buf, 0, 9)
    assert one(ring) == (9, 3, 0)
    assert buf[:3] == b"abc"


def test_fallocate_punch_hole_reads_zeros(ring, datafile):
    data = pattern(3 * 4096, seed=3)
    os.pwrite(datafile, data, 0)
    ring.prep_fallocate(datafile, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 4096, 5)
    assert one(ring) == (5, 0, 0)
    assert os.fstat(datafile).st_size == 3 * 4096
    buf = bytearray(3 * 4096)
    ring.prep_read(datafile, buf, 0, 6)
    assert one(ring) == (6, 3 * 4096, 0)
    assert buf[:4096] == data[:4096]
    assert buf[4096:8192] == bytes(4096)
    assert buf[8192:] == data[8192:]


def test_fallocate_extends_file(ring, datafile):
    ring.prep_fallocate(datafile, 0, 0, 1 << 20, 7)
    assert one(ring) == (7, 0, 0)
    assert os.fstat(datafile).st_size == 1 << 20


def test_splice_file_pipe_file(ring, tmp_path):
    data = pattern(16384, seed=9)
    src = os.open(tmp_path / "src", os.O_RDWR | os.O_CREAT, 0o600)
    dst = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT, 0o600)
    rd, wr = os.pipe()
    try:
        os.pwrite(src, data, 0)
        ring.prep_splice(src, 4096, wr, -1, 8192, 0, 1, SQE_IO_LINK)
        ring.prep_splice(rd, -1, dst, 512, 8192, 0, 2)
        assert ring.completions(2, 5.0) == [(1, 8192, 0), (2, 8192, 0)]
        assert os.pread(dst, 8192, 512) == data[4096:12288]
        assert os.pread(dst, 512, 0) == bytes(512)
    finally:
        for fd in (src, dst, rd, wr):
            os.close(fd)


def test_read_on_closed_fd_completes_with_ebadf(ring, tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    ring.prep_read(fd, bytearray(512), 0, 11)
    assert one(ring) == (11, -errno.EBADF, 0)


def test_pins_released_after_reap(ring, datafile):
    buf = bytearray(4096)
    ring.prep_read(datafile, buf, 0, 12)
    assert one(ring)[0] == 12
    buf.extend(b"x")  # would raise BufferError if the ring still held an export


# -- registration -------------------------------------------------------------------------

def test_fixed_buffers_write_then_read(ring, datafile):
    wbuf = bytearray(pattern(8192, seed=5))
    rbuf = bytearray(8192)
    ring.register_buffers([wbuf, rbuf])
    ring.prep_write_fixed(datafile, memoryview(wbuf)[4096:], 0, 0, 1)  # inside buffer 0
    assert one(ring) == (1, 4096, 0)
    assert os.pread(datafile, 4096, 0) == wbuf[4096:]
    ring.prep_read_fixed(datafile, rbuf, 0, 1, 2)
    assert one(ring) == (2, 4096, 0)
    assert rbuf[:4096] == wbuf[4096:]
    ring.unregister_buffers()
    ring.prep_read_fixed(datafile, rbuf, 0, 1, 3)
    assert one(ring)[1] < 0  # no table any more


def test_register_buffers_rejects_bad_input(ring):
    with pytest.raises(ValueError, match="read-only"):
        ring.register_buffers([b"immutable"])
    with pytest.raises(ValueError, match="at least one"):
        ring.register_buffers([])


def test_register_buffers_sparse(ring, datafile):
    ring.register_buffers_sparse(8)
    ring.prep_read_fixed(datafile, bytearray(512), 0, 3, 21)
    assert one(ring) == (21, -errno.EFAULT, 0)  # empty slot
    ring.unregister_buffers()
    rbuf = bytearray(4096)
    ring.register_buffers([rbuf])  # the table can be replaced after unregistering
    os.pwrite(datafile, b"sparse", 0)
    ring.prep_read_fixed(datafile, rbuf, 0, 0, 22)
    assert one(ring) == (22, 6, 0) and rbuf[:6] == b"sparse"


def test_register_files_and_fixed_file(ring, datafile):
    from pyublk_fast._core.ring import SQE_FIXED_FILE
    os.pwrite(datafile, b"fixed", 0)
    ring.register_files([datafile])
    buf = bytearray(5)
    ring.prep_read(0, buf, 0, 31, SQE_FIXED_FILE)
    assert one(ring) == (31, 5, 0) and buf == b"fixed"


def test_register_files_bad_fd(ring):
    with pytest.raises(OSError) as ei:
        ring.register_files([123456])
    assert ei.value.errno == errno.EBADF and "is every fd open" in str(ei.value)


# -- MSG_RING -----------------------------------------------------------------------------

def test_msg_ring_posts_on_target():
    with Ring(8) as src, Ring(8) as dst:
        src.prep_msg_ring(dst, 1234, 0xDEAD_BEEF_0000_0001)
        assert one(src) == (0xDEAD_BEEF_0000_0001, 0, 0)
        assert one(dst) == (0xDEAD_BEEF_0000_0001, 1234, 0)
        src.prep_msg_ring(dst.fd, 0, U64_MAX)  # a raw ring fd works too
        assert one(src)[0] == U64_MAX
        assert one(dst) == (U64_MAX, 0, 0)


def test_msg_ring_skip_success_suppresses_source_cqe():
    with Ring(8) as src, Ring(8) as dst:
        src.prep_msg_ring(dst, 7, 77, SQE_CQE_SKIP_SUCCESS)
        src.prep_nop(78)
        assert one(src) == (78, 0, 0)  # only the NOP
        assert src.reap() == 0
        assert one(dst) == (77, 7, 0)
        assert dst.reap() == 0


def test_msg_ring_to_non_ring_fd_fails(ring, devnull):
    ring.prep_msg_ring(devnull, 1, 5)
    assert one(ring) == (5, -errno.EBADFD, 0)
    with pytest.raises(ValueError, match="invalid ring fd"):
        ring.prep_msg_ring(-1, 1, 5)


# -- setup and misuse ---------------------------------------------------------------------

def test_setup_reports_sizes():
    with Ring(5, cq_entries=100) as r:
        assert r.sq_entries == 8 and r.cq_entries == 128  # kernel rounds to powers of two
        assert len(r.cqe_user_data) == len(r.cqe_res) == len(r.cqe_flags) == 128
        assert r.fd >= 0 and r.features & (1 << 1)  # IORING_FEAT_NODROP


@pytest.mark.parametrize("entries", [0, 32769])
def test_setup_bad_entries(entries):
    with pytest.raises(ValueError, match=f"entries={entries} out of range"):
        Ring(entries)


def test_setup_cq_smaller_than_sq():
    with pytest.raises(ValueError, match="cq_entries=4 must be >= entries=8"):
        Ring(8, cq_entries=4)


def test_setup_defer_taskrun_needs_single_issuer():
    with pytest.raises(ValueError, match="needs SETUP_SINGLE_ISSUER"):
        Ring(4, SETUP_DEFER_TASKRUN)
    with Ring(4, SETUP_DEFER_TASKRUN | SETUP_SINGLE_ISSUER) as r:
        r.prep_nop(3)
        assert one(r) == (3, 0, 0)


IORING_SETUP_TASKRUN_FLAG = 1 << 9


def test_coop_taskrun_ring_sets_taskrun_flag_and_completes_file_io(datafile):
    """A thread polling a COOP_TASKRUN ring's CQ only learns of a finished read through
    IORING_SQ_TASKRUN, so Ring asks for that flag with either TASKRUN mode."""
    with Ring(8, SETUP_COOP_TASKRUN | SETUP_SINGLE_ISSUER) as r:
        assert r.setup_flags & IORING_SETUP_TASKRUN_FLAG
        data = pattern(4096, seed=3)
        r.prep_write(datafile, data, 0, 1)
        assert one(r) == (1, 4096, 0)
        buf = bytearray(4096)
        r.prep_read(datafile, buf, 0, 2)
        assert one(r) == (2, 4096, 0) and bytes(buf) == data
    with Ring(8) as r:
        assert not r.setup_flags & IORING_SETUP_TASKRUN_FLAG


@pytest.mark.parametrize("flags", [1 << 30, 0xFFFF_FFFF])
def test_setup_unsupported_flags_oserror(flags):
    with pytest.raises(OSError) as ei:
        Ring(4, flags)
    assert ei.value.errno == errno.EINVAL
    msg = str(ei.value)
    assert f"flags={flags:#x}" in msg and "not supported by this kernel" in msg


def test_closed_ring_raises_valueerror(datafile):
    r = Ring(4)
    r.close()
    r.close()  # idempotent
    assert r.closed
    calls = [
        lambda: r.prep_nop(1), r.submit, r.wait, r.reap, r.completions, r.cq_ready,
        r.sq_space_left, lambda: r.fd, lambda: r.features,
        lambda: r.prep_read(datafile, bytearray(8), 0, 1),
        lambda: r.register_buffers([bytearray(8)]), lambda: r.register_buffers_sparse(2),
        lambda: r.register_files([datafile]), r.unregister_buffers,
    ]
    for call in calls:
        with pytest.raises(ValueError, match="closed Ring"):
            call()


def test_full_sq_raises_and_ring_keeps_working():
    with Ring(4) as r:
        for i in range(r.sq_entries):
            r.prep_nop(i)
        assert r.sq_space_left() == 0
        with pytest.raises(RingFullError, match="submission queue full \\(4 entries\\)"):
            r.prep_nop(99)
        with pytest.raises(RingFullError):
            r.prep_read(0, bytearray(8), 0, 99)
        assert r.completions(4, 5.0) == [(i, 0, 0) for i in range(4)]
        r.prep_nop(5)
        assert one(r) == (5, 0, 0)


def test_wait_timeout():
    with Ring(4) as r:
        with pytest.raises(TimeoutError, match="no completion within 0.05 s"):
            r.wait(1, timeout=0.05)
        with pytest.raises(ValueError, match="timeout must be >= 0"):
            r.wait(1, timeout=-1)
        r.prep_nop(1)
        assert r.wait(2, timeout=0.05) == 1  # partial batch is returned, not lost
        assert r.cqe_user_data[0] == 1


def test_wait_min_complete_above_cq_size():
    with Ring(4) as r:
        with pytest.raises(ValueError, match=f"min_complete={r.cq_entries + 1} exceeds"):
            r.wait(r.cq_entries + 1)


def _in_thread(fn):
    out = {}

    def run():
        try:
            out["ret"] = fn()
        except BaseException as e:  # handed back to the test thread
            out["exc"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert not t.is_alive()
    return out


@pytest.mark.parametrize("extra", [0, SETUP_DEFER_TASKRUN])
def test_single_issuer_from_other_thread(extra):
    with Ring(4, SETUP_SINGLE_ISSUER | extra) as r:
        r.prep_nop(1)
        assert one(r) == (1, 0, 0)  # this thread now owns the ring
        r.prep_nop(2)
        for fn in (r.submit, lambda: r.wait(1, timeout=0.1)):
            out = _in_thread(fn)
            exc = out.get("exc")
            assert isinstance(exc, OSError) and exc.errno == errno.EEXIST, out
            assert "SINGLE_ISSUER" in str(exc) and "owning thread" in str(exc)
        assert one(r) == (2, 0, 0)  # the owner still submits the pending SQE


def test_plain_ring_usable_from_other_thread():
    with Ring(4) as r:
        r.prep_nop(8)
        out = _in_thread(lambda: r.completions(1, 5.0))
        assert out == {"ret": [(8, 0, 0)]}


def test_ring_closed_from_another_thread_while_its_owner_waits():
    """A device handle may be closed from one thread while another waits on its ring:
    the ring is closed for later calls at once, the waiter still gets what completes,
    and the ring is torn down as that wait returns (not under it: that crashed)."""
    ring, other = Ring(8), Ring(8)
    try:
        fd = ring.fd
        got: list = []
        waiter = threading.Thread(target=lambda: got.append(ring.completions(1, 10.0)))
        waiter.start()
        assert wait_until(lambda: ring.waiters == 1, 5), "the waiter did not enter its wait"
        ring.close()
        assert ring.closed and ring.waiters == 1
        other.prep_msg_ring(fd, 7, 42)           # wake the waiter through the kernel
        other.submit()
        waiter.join(10)
        assert not waiter.is_alive() and got == [[(42, 7, 0)]]
        assert ring.waiters == 0
        with pytest.raises(ValueError, match="closed Ring"):
            ring.prep_nop(1)
    finally:
        other.close()
        ring.close()


# -- the queue loop's adaptive poll --------------------------------------------------------

def test_adaptive_poll_grows_to_catch_completions_that_come_within_poll_us(ring):
    """A completion 200 us after each submit, with poll_us 5000 and a budget left short by
    an idle spell (1 us): the first wait sleeps and sets the budget to twice what it
    waited, and from then on the poll catches every completion, its budget doubling up
    to poll_us. (It used to halve on each wait the short budget missed, and never grew
    again: a queue at depth 1 slept for every request.)"""
    budget, budgets = 1000, []
    for i in range(12):
        ring.prep_timeout(i, 200e-6)
        n, budget = ring.wait_adaptive(5000.0, budget)
        assert n == 1 and ring.cqe_user_data[0] == i and ring.cqe_res[0] == -errno.ETIME
        budgets.append(budget)
    assert budgets[0] >= 2 * 200_000, budgets             # a poll that long would have caught it
    assert budgets[-1] >= 2_500_000, budgets              # at most one halving from poll_us
    assert all(b <= 5_000_000 for b in budgets), budgets


def test_adaptive_poll_halves_when_nothing_comes_within_poll_us(ring):
    """An idle queue sleeps: a wait longer than poll_us halves the budget."""
    ring.prep_timeout(1, 0.02)
    n, budget = ring.wait_adaptive(1000.0, 800_000)
    assert n == 1 and budget == 400_000
