"""The KV cache tensors: one pool of fixed-size blocks per layer, allocated once at start-up.

k[layer], v[layer]: [num_blocks, block_size, H_kv, D], on that layer's device (a model spread over
GPUs keeps each layer's cache beside it). Which block belongs to whom is the block manager's
business; this module only sizes the pool, hands out flat views for writes and gathers, and copies
blocks for copy-on-write. The pool never grows after start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        element = torch.finfo(dtype).bits // 8
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element


def blocks_for_budget(shape: CacheShape, dtype: torch.dtype, budget_bytes: int, block_size: int) -> int:
    """How many blocks (block 0, reserved, included) fit in `budget_bytes`."""
    return budget_bytes // (shape.bytes_per_token(dtype) * block_size)


class KVPool:
    """Keys and values of every cached token, in blocks."""

    def __init__(
        self,
        shape: CacheShape,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        devices: list[torch.device],
    ) -> None:
        self.shape = shape
        self.num_blocks = num_blocks
        self.block_size = block_size
        dims = (num_blocks, block_size, shape.num_kv_heads, shape.head_dim)
        self.k = [torch.zeros(dims, dtype=dtype, device=devices[i]) for i in range(shape.num_layers)]
        self.v = [torch.zeros(dims, dtype=dtype, device=devices[i]) for i in range(shape.num_layers)]
        self.devices = devices
        # CPU only: where gathered blocks are copied, reused from step to step (see gather).
        self._gather_k: torch.Tensor | None = None
        self._gather_v: torch.Tensor | None = None

    @property
    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def release(self) -> None:
        """Free the cache's memory (the pool is unusable afterwards)."""
        self.k, self.v = [], []

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [num_blocks * block_size, H_kv, D]: slot s of block b is row b * block_size + s."""
        k, v = self.k[layer], self.v[layer]
        return k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])

    def gather(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the keys and values of `blocks` ([n] long), each [n, block_size, H_kv, D].

        On the CPU they are written into buffers kept from one call to the next (valid until the
        next call): the copies of a step of 32 short decodes take ~10 MB a layer, and a fresh
        allocation of that size comes from the OS as untouched pages each time (glibc returns
        large freed blocks), so every copy paid a page fault per 4 KiB: measured 40,000 faults and
        ~50 ms more per step. Elsewhere (the CUDA caching allocator reuses memory) plain copies.
        """
        k, v = self.k[layer], self.v[layer]
        if k.device.type != "cpu":
            return k.index_select(0, blocks), v.index_select(0, blocks)
        shape = (blocks.numel(), *k.shape[1:])
        numel = shape[0] * k[0].numel()
        if self._gather_k is None or self._gather_k.numel() < numel:
            self._gather_k = torch.empty(numel, dtype=k.dtype)
            self._gather_v = torch.empty(numel, dtype=v.dtype)
        assert self._gather_v is not None
        out_k, out_v = self._gather_k[:numel].view(shape), self._gather_v[:numel].view(shape)
        torch.index_select(k, 0, blocks, out=out_k)
        torch.index_select(v, 0, blocks, out=out_v)
        return out_k, out_v

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks (source, destination), in order, in every layer (copy-on-write)."""
        if not copies:
            return
        for layer in range(self.shape.num_layers):
            device = self.k[layer].device
            src = torch.tensor([s for s, _ in copies], device=device)
            dst = torch.tensor([d for _, d in copies], device=device)
            for cache in (self.k[layer], self.v[layer]):
                cache.index_copy_(0, dst, cache.index_select(0, src))
