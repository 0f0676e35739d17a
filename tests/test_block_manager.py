"""KV blocks without torch: reference counts, prefix keys, LRU eviction, forks and copy-on-write."""

from __future__ import annotations

import itertools

import pytest

from model_runtime.engine.block_manager import NULL_BLOCK, BlockPool, KVCacheManager, block_key
from model_runtime.engine.sequence import ImageSlot, Request
from model_runtime.sampling_params import SamplingParams

_ids = itertools.count()


def make_request(prompt: list[int], *, n: int = 1, images: list[ImageSlot] | None = None, root: bytes = b""):
    params = SamplingParams(n=n, max_tokens=8, temperature=0.0)
    request = Request(f"r{next(_ids)}", list(prompt), params, max_tokens=8, images=images or [])
    request.cache_root = root
    return request


def image(key: str, start: int, tokens: int) -> ImageSlot:
    return ImageSlot(key=key, num_tiles=1, pixel_values=None, start=start, num_tokens=tokens)


def test_block_zero_is_never_handed_out_and_refs_count() -> None:
    pool = BlockPool(4)
    blocks = [pool.allocate() for _ in range(3)]
    assert NULL_BLOCK not in blocks and pool.num_free == 0 and pool.num_used == 3
    pool.retain(blocks[0])
    pool.release(blocks[0])
    assert pool.num_free == 0
    pool.release(blocks[0])
    assert pool.num_free == 1 and pool.allocate() == blocks[0]


def test_keys_depend_on_parent_tokens_and_images() -> None:
    base = block_key(b"", [1, 2, 3])
    assert block_key(b"", [1, 2, 3]) == base
    assert block_key(b"x", [1, 2, 3]) != base
    assert block_key(b"", [1, 2, 4]) != base
    assert block_key(b"", [9, 9], [("img-a", 0)]) != block_key(b"", [9, 9], [("img-b", 0)])
    assert block_key(b"", [9, 9], [("img-a", 0)]) != block_key(b"", [9, 9], [("img-a", 2)])


def test_prefix_match_takes_full_blocks_and_leaves_the_last_token() -> None:
    kv = KVCacheManager(16, 4)
    first = make_request(list(range(10))).seqs[0]
    assert kv.match_prefix(first) == 0
    assert kv.allocate(first, first.num_tokens)
    first.num_computed = 10
    kv.cache_computed(first)  # blocks [0-3], [4-7] are full; [8-9] is not
    kv.free(first)
    again = make_request(list(range(10))).seqs[0]
    assert kv.match_prefix(again) == 8
    exact = make_request(list(range(8))).seqs[0]  # all 8 tokens cached, but token 7 must be computed
    assert kv.match_prefix(exact) == 4
    other = make_request([99] + list(range(1, 10))).seqs[0]
    assert kv.match_prefix(other) == 0
    assert kv.query_tokens == 10 + 10 + 8 + 10 and kv.hit_tokens == 12


def test_different_images_share_no_blocks_the_same_image_does() -> None:
    kv = KVCacheManager(32, 4)
    prompt = [1, 2] + [7] * 8 + [3, 4, 5]  # image tokens (id 7) at 2..9
    a = make_request(prompt, images=[image("cat", 2, 8)]).seqs[0]
    kv.match_prefix(a)
    kv.allocate(a, a.num_tokens)
    a.num_computed = a.num_tokens
    kv.cache_computed(a)
    kv.free(a)
    dog = make_request(prompt, images=[image("dog", 2, 8)]).seqs[0]
    assert kv.match_prefix(dog) == 0  # block 0 already holds image tokens
    cat = make_request(prompt, images=[image("cat", 2, 8)]).seqs[0]
    assert kv.match_prefix(cat) == 12


def test_salted_roots_do_not_share() -> None:
    kv = KVCacheManager(16, 4)
    a = make_request(list(range(9)), root=b"tenant-a").seqs[0]
    kv.match_prefix(a)
    kv.allocate(a, 9)
    a.num_computed = 9
    kv.cache_computed(a)
    kv.free(a)
    assert kv.match_prefix(make_request(list(range(9)), root=b"tenant-b").seqs[0]) == 0
    assert kv.match_prefix(make_request(list(range(9)), root=b"tenant-a").seqs[0]) == 8


def test_cached_blocks_are_evicted_least_recently_used_first() -> None:
    kv = KVCacheManager(5, 2)  # 4 usable blocks
    old = make_request([1, 2, 3]).seqs[0]
    new = make_request([5, 6, 7]).seqs[0]
    for seq in (old, new):
        kv.match_prefix(seq)
        kv.allocate(seq, 3)
        seq.num_computed = 3
        kv.cache_computed(seq)  # one full block each
        kv.free(seq)
    assert kv.pool.num_free == 4 and len(kv.pool.by_key) == 2
    for _ in range(3):  # two unkeyed free blocks, then the least recently used cached one
        kv.pool.allocate()
    assert kv.match_prefix(make_request([5, 6, 7]).seqs[0]) == 2  # the newer prefix survived
    assert kv.match_prefix(make_request([1, 2, 3]).seqs[0]) == 0


def test_fork_shares_blocks_and_copy_on_write_splits_the_partial_one() -> None:
    kv = KVCacheManager(16, 4)
    request = make_request(list(range(6)), n=3)
    first, second, third = request.seqs
    kv.allocate(first, 6)
    first.num_computed = 6
    kv.fork(first, second)
    kv.fork(first, third)
    assert second.block_table == first.block_table and kv.pool.refs[first.block_table[1]] == 3
    used = kv.pool.num_used
    copy = kv.copy_on_write(second, 6)  # block 1 holds tokens 4-5 and is shared
    assert copy == (first.block_table[1], second.block_table[1]) and kv.pool.num_used == used + 1
    assert kv.copy_on_write(second, 7) is None  # now its own
    assert kv.pool.refs[first.block_table[0]] == 3  # full blocks stay shared
    kv.copy_on_write(third, 6)
    assert kv.copy_on_write(first, 6) is None  # the last holder writes in place
    for seq in request.seqs:
        kv.free(seq)
    assert kv.pool.num_used == 0


def test_allocate_respects_the_reserve_and_changes_nothing_when_it_cannot() -> None:
    kv = KVCacheManager(5, 4)  # 4 usable
    seq = make_request(list(range(12))).seqs[0]
    assert not kv.allocate(seq, 12, reserve=2)
    assert seq.block_table == [] and kv.pool.num_free == 4
    assert kv.allocate(seq, 12, reserve=1)
    assert len(seq.block_table) == 3


def test_a_pool_needs_a_usable_block() -> None:
    with pytest.raises(ValueError, match="at least two blocks"):
        BlockPool(1)


def test_a_prompt_gets_a_contiguous_run_and_its_growth_continues_it() -> None:
    kv = KVCacheManager(64, 4)
    first, second = (make_request(list(range(10))).seqs[0] for _ in range(2))
    assert kv.allocate(first, 10, growth=12)  # 3 blocks, then 3 reserved for the answer
    assert kv.allocate(second, 10, growth=12)  # its own run, after first's reservation
    assert first.block_table == [1, 2, 3] and second.block_table == [7, 8, 9]
    for tokens in (13, 17, 21):  # first grows into its reservation
        assert kv.allocate(first, tokens)
    assert first.block_table == [1, 2, 3, 4, 5, 6]
    kv.free(second)  # its unused reservation is plain free again
    assert kv.pool.num_free == 63 - 6 and set(kv.pool.state[7:13]) == {1}


def test_reserved_blocks_go_to_others_when_nothing_else_is_free() -> None:
    kv = KVCacheManager(9, 4)  # 8 usable
    holder, other = (make_request(list(range(8))).seqs[0] for _ in range(2))
    assert kv.allocate(holder, 8, growth=100)  # 2 blocks, 6 reserved
    assert kv.pool.num_free == 6
    assert kv.allocate(other, 24)  # 6 blocks: only reserved ones are left, so it takes them
    assert kv.pool.num_free == 0 and not set(holder.block_table) & set(other.block_table)
