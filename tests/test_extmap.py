"""pyublk_fast.aio.ExtentMap on its own: the table (bounded, never answering with
another extent's place), the withdraw / in-flight / settle protocol as a queue thread
sees it (MapReader stands in for one), and the refusal of bad arguments."""
import random

import pytest

from pyublk_fast.aio import ExtentMap
from pyublk_fast.backends.memory import MemoryBackend
from pyublk_fast.device import Device


def test_a_small_table_keeps_what_fits_and_never_answers_for_another_extent():
    m = ExtentMap(16, 16)
    rng = random.Random(1)
    where = {}
    for i in rng.sample(range(1 << 20), 2000):
        where[i] = (3 + i % 5, i << 16 ^ 0x5000)
        m.publish(i, *where[i], writable=bool(i & 1))
    assert m.entries == 16
    found = 0
    for i, (fd, off) in where.items():
        got = m.lookup(i)
        if got is not None:
            found += 1
            assert got == (fd, off, bool(i & 1)), f"extent {i}"
    assert found == 16
    for i in range(1 << 12):           # never published
        if i not in where:
            assert m.lookup(i) is None
    m.clear()
    assert m.entries == 0


def test_publish_again_replaces_in_place():
    m = ExtentMap(12, 4)
    for i in range(4):
        m.publish(i * 1, 5, i * 4096)
    m.publish(2, 6, 1 << 30, writable=False)
    assert m.entries == 4 and m.lookup(2) == (6, 1 << 30, False)
    assert [m.lookup(i) for i in (0, 1, 3)] == [(5, 0, True), (5, 4096, True), (5, 3 * 4096, True)]


def test_a_reader_counts_before_it_looks_and_a_withdrawal_waits_for_it():
    """What a queue thread does (MapReader): a hit stays counted until leave(); withdraw
    takes the entry out and reports the I/O in flight; the leave of a request on the
    draining set calls on_drained; while the set drains, every extent of it misses (the
    handlers serve them); settle() ends that."""
    woken = []
    m = ExtentMap(16, 8, on_drained=lambda: woken.append(1))   # 2 sets
    a, b = 4, 6                         # the same set (index & 1)
    m.publish(a, 9, 0x10000)
    m.publish(b, 9, 0x20000)
    q1, q2 = m.reader(), m.reader()
    assert q1.enter(a) == (9, 0x10000)
    assert q2.enter(b, write=True) == (9, 0x20000)
    assert m.served == 2
    assert m.in_flight(a) and m.in_flight(b)
    assert m.withdraw(a) is True
    assert m.lookup(a) is None and m.lookup(b) == (9, 0x20000, True)
    # a miss counts for a moment too: the withdrawal may have seen that, so it wakes
    assert q2.enter(b) is None, "a draining set served a request"
    assert len(woken) == 1
    assert q1.enter(5) is None          # the other set: a miss, as it holds nothing
    assert len(woken) == 1
    q2.leave(b)
    assert len(woken) == 2
    assert m.in_flight(a)
    q1.leave(a)
    assert len(woken) == 3 and not m.in_flight(a)
    m.settle(a)
    assert q2.enter(b) == (9, 0x20000)
    q2.leave(b)
    assert len(woken) == 3, "woken with nobody draining"
    with pytest.raises(ValueError, match="without an enter"):
        q2.leave(b)
    q1.close()
    q2.close()


def test_writes_miss_a_read_only_entry_and_after_forbid_writes():
    m = ExtentMap(12, 4)
    q = m.reader()
    m.publish(0, 3, 0, writable=False)
    m.publish(1, 3, 4096)
    assert q.enter(0, write=True) is None
    assert q.enter(1, write=True) == (3, 4096)
    q.leave(1)
    m.forbid_writes()
    assert q.enter(1, write=True) is None
    assert q.enter(1) == (3, 4096)
    q.leave(1)
    q.close()


def test_a_closed_reader_no_longer_holds_a_withdrawal_up():
    """A queue that goes away with I/O counted (a forced exit, its I/O drained by the
    queue) lets the waiting withdrawal go, and wakes it."""
    woken = []
    m = ExtentMap(12, 4, on_drained=lambda: woken.append(1))
    m.publish(7, 3, 0)
    q = m.reader()
    assert q.enter(7) is not None
    assert m.withdraw(7) is True
    q.close()
    assert woken == [1] and not m.in_flight(7)
    m.settle(7)
    with pytest.raises(ValueError, match="closed"):
        q.enter(7)


@pytest.mark.parametrize("args,exc,match", [
    ((8,), ValueError, "extent_bits=8"),
    ((41,), ValueError, "extent_bits=41"),
    ((12, 6), ValueError, "capacity=6: a power of two"),
    ((12, 2), ValueError, "capacity=2"),
    ((12, 1 << 25), ValueError, "capacity="),
    ((12, 4, 5), TypeError, "on_drained must be callable"),
])
def test_bad_construction_is_refused(args, exc, match):
    with pytest.raises(exc, match=match):
        ExtentMap(*args)


def test_bad_calls_are_refused():
    m = ExtentMap(30, 4)
    with pytest.raises(ValueError, match="fd -1"):
        m.publish(0, -1, 0)
    with pytest.raises(ValueError, match="past 2\\*\\*64"):
        m.publish(1 << 34, 3, 0)
    with pytest.raises(RuntimeError, match="without a withdraw"):
        m.settle(0)
    with pytest.raises(TypeError):
        type(m.reader())()


def test_a_backend_whose_extent_map_is_not_one_is_refused_at_start(sim):
    backend = MemoryBackend(1 << 20)
    backend.extent_map = {0: (3, 0)}
    with pytest.raises(TypeError, match="MemoryBackend.extent_map must be a pyublk_fast.aio.ExtentMap"):
        with Device(backend, sim, depth=4):
            pass
