"""The batch reaper returns exactly what was submitted: order, wrap-around, CQ overflow."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyublk_fast._core.ring import Ring

U64 = st.integers(0, 2**64 - 1)


def reaped(r: Ring, n: int) -> list[int]:
    assert n <= r.cq_entries
    assert not r.cqe_res[:n].any() and not r.cqe_flags[:n].any()
    return r.cqe_user_data[:n].tolist()


def submit_nops(r: Ring, uds) -> None:
    for ud in uds:
        r.prep_nop(ud)
    assert r.submit() == len(uds)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(U64, min_size=1, max_size=32), min_size=1, max_size=20))
def test_batches_match_reference(batches):
    """Each batch is submitted then reaped; NOPs complete in submission order."""
    with Ring(32) as r:
        for batch in batches:
            submit_nops(r, batch)
            got = []
            while len(got) < len(batch):
                got += reaped(r, r.wait(1, timeout=5.0))
            assert got == batch
            assert r.reap() == 0


@settings(max_examples=30, deadline=None)
@given(st.lists(U64, min_size=1, max_size=200), st.integers(1, 16))
def test_interleaved_submit_and_reap(uds, chunk):
    """Submitting in chunks and reaping lazily still yields the exact sequence."""
    with Ring(16, cq_entries=64) as r:
        got = []
        for i in range(0, len(uds), chunk):
            submit_nops(r, uds[i:i + chunk])
            if i % 3 == 0:
                got += reaped(r, r.reap())
        while len(got) < len(uds):
            got += reaped(r, r.wait(1, timeout=5.0))
        assert got == uds


def test_cq_wrap_around_small_ring():
    """Thousands of ops through a 4-entry SQ / 8-entry CQ: the head wraps many times.
    Completions are sometimes left to pile up until the CQ is exactly full."""
    rng = np.random.default_rng(1)
    sent, got = [], []
    pending = 0
    with Ring(4) as r:
        while len(sent) < 5000:
            size = int(rng.integers(1, 5))
            if pending + size > r.cq_entries or rng.random() < 0.3:
                n = r.wait(pending, timeout=5.0) if pending else 0
                got += reaped(r, n)
                pending -= n
            batch = rng.integers(0, 2**64 - 1, size, dtype=np.uint64, endpoint=True).tolist()
            submit_nops(r, batch)
            sent += batch
            pending += size
        while pending:
            n = r.wait(1, timeout=5.0)
            got += reaped(r, n)
            pending -= n
    assert got == sent


def test_wait_reaps_at_most_cq_size_per_call():
    with Ring(8, cq_entries=8) as r:
        for k in range(3):
            submit_nops(r, range(k * 8, k * 8 + 8))
        got = []
        while len(got) < 24:
            n = r.reap()
            assert 0 < n <= 8
            got += reaped(r, n)
        assert got == list(range(24))


@pytest.mark.parametrize("rounds", [3, 40])
def test_full_cq_overflow_flushed_without_loss(rounds):
    """More than cq_entries NOPs without reaping: the kernel parks the extra CQEs on its
    overflow list (IORING_FEAT_NODROP) and reap() must flush them, in order, exactly once."""
    with Ring(4) as r:
        assert r.features & (1 << 1)  # IORING_FEAT_NODROP
        sent = []
        for k in range(rounds):
            batch = [(k << 32) | i for i in range(r.sq_entries)]
            submit_nops(r, batch)
            sent += batch
        assert len(sent) > r.cq_entries
        assert r.cq_ready() == r.cq_entries  # the ring itself is full
        got = []
        while True:
            n = r.reap()
            if not n:
                break
            got += reaped(r, n)
        assert got == sent
        assert r.cq_ready() == 0
        r.prep_nop(2**64 - 1)  # still healthy
        assert r.completions(1, 5.0) == [(2**64 - 1, 0, 0)]


def test_overflow_then_wait_min_complete():
    with Ring(4) as r:
        for k in range(4):
            submit_nops(r, range(k * 4, k * 4 + 4))
        got = []
        while len(got) < 16:
            got += reaped(r, r.wait(1, timeout=5.0))
        assert got == list(range(16))
