"""The host buffer pool: reuse by size, the cap, and reclaiming idle buffers for other reservations."""

import pytest

from hetero.runtime.buffers import BufferPool
from hetero.runtime.memory import Accountant, BudgetExceeded


def test_buffers_are_reused_by_size_and_stay_reserved():
    acc = Accountant({"cpu": 1 << 20})
    pool = BufferPool(acc, "staging", cap=1 << 20)
    a = pool.take(8192)
    assert a.numel() == 8192 and a.data_ptr() % 4096 == 0
    ptr = a.data_ptr()
    pool.give(a)
    assert acc.held["cpu"] == 8192  # idle, still reserved: the accountant counts what the process holds
    b = pool.take(8192)
    assert b.data_ptr() == ptr and acc.held["cpu"] == 8192  # the same memory, no new reservation
    c = pool.take(4096)  # another size: a fresh buffer
    assert c.data_ptr() != ptr and acc.held["cpu"] == 12288


def test_the_cap_gives_idle_buffers_up_largest_first():
    acc = Accountant({"cpu": None})
    pool = BufferPool(acc, "staging", cap=16384)
    big, small = pool.take(8192), pool.take(4096)
    pool.give(big), pool.give(small)
    pool.take(12288)  # 12288 + 12288 idle > cap: the 8192 idle buffer goes, the 4096 one stays
    assert pool.held == 16384 and acc.held["cpu"] == 16384 and list(pool.idle) == [4096]
    pool.clear()
    assert pool.held == 12288 and acc.held["cpu"] == 12288


def test_the_accountant_reclaims_idle_buffers_before_refusing():
    acc = Accountant({"cpu": 16384})
    pool = BufferPool(acc, "staging", cap=16384)
    acc.reclaimers.append(pool.reclaim)
    buf = pool.take(12288)
    pool.give(buf)
    acc.reserve("cpu", 8192, "kv")  # fits only once the idle buffer is given up
    assert pool.held == 0 and acc.held["cpu"] == 8192
    live = pool.take(8192)
    with pytest.raises(BudgetExceeded):  # buffers in use are never reclaimed
        acc.reserve("cpu", 4096, "kv")
    assert live.numel() == 8192


def test_a_pool_without_an_accountant_reserves_nothing():
    acc = Accountant({"cpu": 4096})
    pool = BufferPool(None, "expert_cache", cap=1 << 30)
    pool.give(pool.take(1 << 16))
    assert acc.held["cpu"] == 0 and pool.held == 1 << 16
