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
import heapq
from array import array
from collections import OrderedDict
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


# Block states: held; free; cached (keyed, unreferenced); reserved (free, but kept for the growth of
# the sequence whose blocks end right before it, and handed to others only when nothing else is free).
_USED, _FREE, _CACHED, _RESERVED = 0, 1, 2, 3
MAX_RESERVED_BLOCKS = 64


class BlockPool:
    """Reference-counted blocks with a free list and the prefix cache's index.

    Allocation keeps a sequence's blocks contiguous where it can: on a CPU the runner attends over
    a contiguous run in place, without copying it (engine/attention.py), which is most of a long
    context's decode time. A prompt gets a run of free blocks followed by a reservation for its
    answer (up to MAX_RESERVED_BLOCKS, never more than max_tokens needs), so that the blocks it
    takes while decoding continue the run instead of landing wherever another sequence's growth
    left room. A reservation is a preference, not a hold: reserved blocks count as free and go to
    others when nothing else is free.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least two blocks (block 0 is reserved)")
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.key_of: list[bytes | None] = [None] * num_blocks
        self.by_key: dict[bytes, int] = {}
        self.state = bytearray([_FREE]) * num_blocks
        self.state[NULL_BLOCK] = _USED
        self._free_count = num_blocks - 1
        self._lowest: list[int] = list(range(1, num_blocks))  # heap of maybe-free ids (stale ones skipped)
        self.evictable: OrderedDict[int, None] = OrderedDict()  # keyed, unreferenced; LRU first

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (evicting cached ones if need be)."""
        return self._free_count + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    def _take(self, block: int) -> int:
        if self.state[block] in (_FREE, _RESERVED):
            self._free_count -= 1
        else:
            assert self.state[block] == _CACHED
            del self.evictable[block]
            key = self.key_of[block]
            assert key is not None
            del self.by_key[key]
            self.key_of[block] = None
        self.state[block] = _USED
        self.refs[block] = 1
        return block

    def _continues(self, after: int | None, count: int) -> bool:
        """Whether the `count` blocks after `after` are free or reserved (for its sequence)."""
        if after is None or after + count >= self.num_blocks:
            return False
        return all(self.state[b] in (_FREE, _RESERVED) for b in range(after + 1, after + 1 + count))

    def allocate(self, after: int | None = None) -> int:
        """A block: the one right after `after` if it is free or reserved, else the lowest free one,
        else a reserved one, else the least recently used cached one (its prefix is forgotten)."""
        if self._continues(after, 1):
            return self._take(after + 1)  # type: ignore[operator]
        while self._lowest:
            block = heapq.heappop(self._lowest)
            if self.state[block] == _FREE:
                return self._take(block)
        reserved = self.state.find(bytes([_RESERVED]), 1)
        if reserved > 0:
            return self._take(reserved)
        return self._take(next(iter(self.evictable)))

    def allocate_run(self, count: int, after: int | None = None, reserve: int = 0) -> tuple[list[int], int]:
        """`count` blocks, consecutive if free blocks allow (right after `after` first), and up to
        `reserve` free blocks after them reserved; returns the blocks and the end of the reservation."""
        if self._continues(after, count):
            blocks = list(range(after + 1, after + 1 + count))  # type: ignore[operator]
        else:
            run = bytes([_FREE]) * count
            start = self.state.find(run + bytes([_FREE]) * reserve, 1) if reserve else -1
            start = start if start > 0 else self.state.find(run, 1)
            if start <= 0:
                return [self.allocate() for _ in range(count)], 0
            blocks = list(range(start, start + count))
        for block in blocks:
            self._take(block)
        end = blocks[-1] + 1
        while end < self.num_blocks and end <= blocks[-1] + reserve and self.state[end] == _FREE:
            self.state[end] = _RESERVED
            end += 1
        return blocks, end

    def unreserve(self, start: int, end: int) -> None:
        """Blocks [start, end) that are still reserved become plainly free."""
        for block in range(start, end):
            if self.state[block] == _RESERVED:
                self.state[block] = _FREE
                heapq.heappush(self._lowest, block)

    def retain(self, block: int) -> None:
        if self.refs[block] == 0:
            assert self.state[block] == _CACHED
            del self.evictable[block]
            self.state[block] = _USED
        self.refs[block] += 1

    def release(self, block: int) -> None:
        assert self.refs[block] > 0, "released a block nobody holds"
        self.refs[block] -= 1
        if self.refs[block]:
            return
        if self.key_of[block] is None:
            self._free(block)
        else:
            self.state[block] = _CACHED
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
            self._free(block)

    def _free(self, block: int) -> None:
        self.state[block] = _FREE
        self._free_count += 1
        heapq.heappush(self._lowest, block)
        if len(self._lowest) > 2 * self.num_blocks:  # blocks taken by runs leave stale entries
            self._lowest = [b for b in range(1, self.num_blocks) if self.state[b] == _FREE]
            heapq.heapify(self._lowest)


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
        if not self.prefix_caching or seq.request.scores_prompt:
            return 0  # a cached block has no logits: a prompt being scored is computed whole
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

    def recomputed_tail(self, seq: Sequence, matched: int) -> int:
        """Tokens of seq's last block that the prefix cache holds but that are computed again (the
        last token's logits are needed): block_size when seq's tokens fill their last block, every
        block before it matched (`matched` tokens) and the cache holds that block too; else 0."""
        size, tokens = self.block_size, seq.num_tokens
        if not self.prefix_caching or tokens % size or matched != tokens - size:
            return 0
        self.extend_keys(seq, tokens)
        return size if self.pool.lookup(seq.block_hashes[tokens // size - 1]) is not None else 0

    def allocate(self, seq: Sequence, num_tokens: int, *, reserve: int = 0, growth: int = 0) -> bool:
        """Grow seq's table to hold `num_tokens` tokens, if that leaves `reserve` blocks free;
        False (and no change) otherwise. `growth`: tokens it may still add, for which blocks right
        after the new ones are reserved if free (see BlockPool)."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need + reserve > self.pool.num_free:
            return False
        last = seq.block_table[-1] if seq.block_table else None
        if need == 1 and not growth:
            seq.block_table.append(self.pool.allocate(last))
            return True
        ahead = min(MAX_RESERVED_BLOCKS, self.blocks_for(growth))
        blocks, reserved_end = self.pool.allocate_run(need, after=last, reserve=ahead)
        seq.block_table.extend(blocks)
        seq.reserved_end = max(seq.reserved_end, reserved_end)
        return True

    def copy_on_write(self, seq: Sequence, position: int) -> tuple[int, int] | None:
        """Before writing token `position`: give seq its own copy of that block if it is shared.
        Returns the (source, destination) block copy the runner must make, or None. The caller
        checks that a block is free."""
        index = position // self.block_size
        block = seq.block_table[index]
        if self.pool.refs[block] == 1:
            return None
        own = self.pool.allocate(seq.block_table[index - 1] if index else None)
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
        if seq.block_table and seq.reserved_end:
            self.pool.unreserve(seq.block_table[-1] + 1, seq.reserved_end)
        for block in reversed(seq.block_table):
            self.pool.release(block)
        seq.block_table = []
        seq.reserved_end = 0
        seq.num_computed = 0
        seq.num_keyed_blocks = 0
