"""BlockPool: atomic allocation, deterministic ids, validated frees."""

import pytest

from infinite_llm.control.blocks import BlockPool, NoFreeBlocksError


def test_new_pool_is_all_free():
    pool = BlockPool(5)
    assert (pool.num_blocks, pool.num_free, pool.num_used) == (5, 5, 0)


def test_negative_size_rejected():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(-1)


def test_empty_pool_allocates_nothing():
    pool = BlockPool(0)
    assert pool.allocate(0) == []
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)


def test_allocate_lowest_ids_first_and_reuses_freed():
    pool = BlockPool(6)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    pool.free([1, 3])
    assert pool.allocate(2) == [1, 3]
    assert pool.num_used == 5 and pool.num_free == 1


def test_allocate_is_all_or_nothing():
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(NoFreeBlocksError, match="only 1"):
        pool.allocate(2)
    assert pool.num_free == 1
    assert pool.allocate(1) == [3]


def test_allocate_negative_rejected():
    with pytest.raises(ValueError):
        BlockPool(2).allocate(-1)


def test_double_free_rejected_and_frees_nothing():
    pool = BlockPool(4)
    pool.allocate(3)
    pool.free([2])
    with pytest.raises(ValueError, match="double free"):
        pool.free([0, 2])
    # The valid block in the failed call was not freed.
    assert pool.is_allocated(0) and pool.num_free == 2


def test_unknown_and_repeated_ids_rejected():
    pool = BlockPool(3)
    pool.allocate(3)
    with pytest.raises(ValueError, match="unknown"):
        pool.free([3])
    with pytest.raises(ValueError, match="unknown"):
        pool.free([-1])
    with pytest.raises(ValueError, match="twice"):
        pool.free([1, 1])
    assert pool.num_free == 0


def test_is_allocated_tracks_state():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    assert pool.is_allocated(b) and not pool.is_allocated(1)
    pool.free([b])
    assert not pool.is_allocated(b)
