"""KV-cache blocks: who holds which block, and which blocks hold a known prefix. Pure Python.

The cache is a pool of fixed-size blocks (kv_cache.KVPool). A sequence's block table lists the
blocks that hold its tokens in order; blocks are taken as the sequence grows, so a short chat holds
a few blocks while one long request may use the whole context.

Sharing. A block may sit in several tables: the `n` choices of one request share the prompt's
blocks, and requests with a common prefix share the blocks of that prefix (automatic prefix
caching). A shared block is never written: full blocks never change, and a sequence about to
append into a shared, partly filled block first gets its own copy of it (copy-on-write; the
runner copies the block's contents before the step's forward).

Prefix caching. A full block is keyed by a hash of its parent block's key, its token ids and, for
image-context tokens, the image's content key and the offset into that image: two different images
never share blocks (their tokens are all the same id), the same image at the same place does. A
sequence's first block hangs off its request's `cache_root` (a tenant salt, a RoPE variant). Keys
are 128-bit BLAKE2b digests, not Python hashes, so a client cannot craft collisions. When the last
table lets go of a keyed block it stays in the pool, evictable, least recently used first; a
lookup revives it.

Block 0 is never handed out: the runner points padding at it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence as Seq

from model_runtime.engine.sequence import Request, Sequence

NULL_BLOCK = 0


def block_key(parent: bytes, tokens: Seq[int], images: Seq[tuple[str, int]] = ()) -> bytes:
    """The prefix-cache key of a full block: (parent key, token ids, (image key, offset) pairs)."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(array("q", tokens).tobytes())
    for key, offset in images:
        digest.update(f"\x00{key}\x00{offset}".encode())
    return digest.digest()


class BlockPool:
    """Reference-counted blocks with a free list and the prefix cache's index."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least two blocks (block 0 is reserved)")
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.key_of: list[bytes | None] = [None] * num_blocks
        self.by_key: dict[bytes, int] = {}
        self.free: deque[int] = deque(range(1, num_blocks))  # unkeyed and unreferenced
        self.evictable: OrderedDict[int, None] = OrderedDict()  # keyed, unreferenced; LRU first

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (evicting cached ones if need be)."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    def allocate(self) -> int:
        if self.free:
            block = self.free.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)  # the least recently used cached prefix
            key = self.key_of[block]
            assert key is not None
            del self.by_key[key]
            self.key_of[block] = None
        self.refs[block] = 1
        return block

    def retain(self, block: int) -> None:
        if self.refs[block] == 0:
            self.evictable.pop(block, None)
        self.refs[block] += 1

    def release(self, block: int) -> None:
        assert self.refs[block] > 0, "released a block nobody holds"
        self.refs[block] -= 1
        if self.refs[block]:
            return
        if self.key_of[block] is None:
            self.free.append(block)
        else:
            self.evictable[block] = None  # most recently used at the end

    def lookup(self, key: bytes) -> int | None:
        return self.by_key.get(key)

    def register(self, block: int, key: bytes) -> None:
        """Record that a full block holds the prefix `key`. A second block with the same content
        (two requests computed the same prefix at once) stays unkeyed and is freed normally."""
        if key in self.by_key or self.key_of[block] is not None:
            return
        self.by_key[key] = block
        self.key_of[block] = key

    def clear_cache(self) -> None:
        """Forget every cached prefix that no table holds (e.g. to reset between benchmark runs)."""
        while self.evictable:
            block, _ = self.evictable.popitem(last=False)
            key = self.key_of[block]
            assert key is not None
            del self.by_key[key]
            self.key_of[block] = None
            self.free.append(block)


class KVCacheManager:
    """Block tables of sequences over one BlockPool; prefix matching and copy-on-write."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.query_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0  # of which found

    # -- sizes ---------------------------------------------------------------------------------------

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_usable * self.block_size

    @property
    def usage(self) -> float:
        return self.pool.num_used / self.pool.num_usable

    # -- keys ----------------------------------------------------------------------------------------

    def _images_in(self, request: Request, start: int, end: int) -> tuple[tuple[str, int], ...]:
        return tuple(
            (image.key, max(start, image.start) - image.start)
            for image in request.images
            if image.start < end and image.end > start
        )

    def extend_keys(self, seq: Sequence, upto_tokens: int) -> None:
        """Compute the keys of seq's full blocks within its first `upto_tokens` tokens."""
        size = self.block_size
        while (len(seq.block_hashes) + 1) * size <= upto_tokens:
            index = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if index else seq.request.cache_root
            start, end = index * size, (index + 1) * size
            images = self._images_in(seq.request, start, end) if start < seq.request.prompt_len else ()
            seq.block_hashes.append(block_key(parent, seq.tokens(start, end), images))

    # -- admission -----------------------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> int:
        """Take the cached blocks of seq's longest cached prefix into its (empty) table; return the
        tokens they hold. At least the last token is left to compute: its logits are needed."""
        assert not seq.block_table, "prefix matching starts from an empty table"
        if not self.prefix_caching:
            return 0
        limit = seq.num_tokens - 1
        self.extend_keys(seq, limit)
        matched = 0
        for key in seq.block_hashes[: limit // self.block_size]:
            block = self.pool.lookup(key)
            if block is None:
                break
            self.pool.retain(block)
            seq.block_table.append(block)
            matched += self.block_size
        seq.num_keyed_blocks = len(seq.block_table)
        self.query_tokens += seq.num_tokens
        self.hit_tokens += matched
        return matched

    def allocate(self, seq: Sequence, num_tokens: int, *, reserve: int = 0) -> bool:
        """Grow seq's table to hold `num_tokens` tokens, if that leaves `reserve` blocks free;
        False (and no change) otherwise."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need + reserve > self.pool.num_free:
            return False
        seq.block_table.extend(self.pool.allocate() for _ in range(need))
        return True

    def copy_on_write(self, seq: Sequence, position: int) -> tuple[int, int] | None:
        """Before writing token `position`: give seq its own copy of that block if it is shared.
        Returns the (source, destination) block copy the runner must make, or None. The caller
        checks that a block is free."""
        index = position // self.block_size
        block = seq.block_table[index]
        if self.pool.refs[block] == 1:
            return None
        own = self.pool.allocate()
        self.pool.release(block)
        seq.block_table[index] = own
        return block, own

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block (and known key) of the parent."""
        assert not child.block_table
        for block in parent.block_table:
            self.pool.retain(block)
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed = parent.num_computed
        child.num_keyed_blocks = parent.num_keyed_blocks

    def cache_computed(self, seq: Sequence) -> None:
        """Key the blocks seq has filled completely, so later prompts can reuse them."""
        if not self.prefix_caching:
            return
        full = seq.num_computed // self.block_size
        if full <= seq.num_keyed_blocks:
            return
        self.extend_keys(seq, full * self.block_size)
        for index in range(seq.num_keyed_blocks, full):
            self.pool.register(seq.block_table[index], seq.block_hashes[index])
        seq.num_keyed_blocks = full

    def free(self, seq: Sequence) -> None:
        """Let go of seq's blocks; its prefix stays cached while nobody needs the space.

        Released tail first, so that under pressure a prefix's later blocks are evicted before its
        first ones (which more prompts share)."""
        for block in reversed(seq.block_table):
            self.pool.release(block)
        seq.block_table = []
        seq.num_computed = 0
        seq.num_keyed_blocks = 0
