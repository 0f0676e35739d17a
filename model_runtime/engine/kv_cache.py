"""The KV cache: one preallocated [slots, kv_heads, max_model_len, head_dim] tensor pair per layer.

Preallocation is the admission control: the scheduler hands out slots, never bytes, so admitted
work cannot run the device out of memory. Views of the cache are passed to transformers' decoder
layers as their `past_key_values` (the layers only call `update`), so the model code stays
transformers' own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    capacity: int  # tokens per slot (max_model_len)

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        element = torch.finfo(dtype).bits // 8
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element

    def bytes_per_slot(self, dtype: torch.dtype) -> int:
        return self.bytes_per_token(dtype) * self.capacity


def default_capacity(
    shape: CacheShape, dtype: torch.dtype, budget_bytes: int, *, want_slots: int, min_len: int
) -> int:
    """max_model_len when the user chose none: the model's own (shape.capacity) if `want_slots`
    sequences of it fit in the budget; otherwise the longest context that lets them fit, in
    multiples of 1024, but never below min_len nor above the model's.

    Why: every slot holds a whole max_model_len context, so the model's own length (32768 for
    InternVL3) can leave room for only a couple of sequences, and the server would run requests
    nearly one at a time.
    """
    if slots_for_budget(shape, dtype, budget_bytes, want_slots) >= want_slots:
        return shape.capacity
    fit = budget_bytes // (want_slots * shape.bytes_per_token(dtype)) // 1024 * 1024
    return min(shape.capacity, max(min_len, fit))


def slots_for_budget(shape: CacheShape, dtype: torch.dtype, budget_bytes: int, max_num_seqs: int) -> int:
    """How many sequences fit in `budget_bytes`; at least one, at most max_num_seqs."""
    return max(1, min(max_num_seqs, budget_bytes // shape.bytes_per_slot(dtype)))


class SlotKVCache:
    """Keys and values of every running sequence, one slot each."""

    def __init__(
        self, shape: CacheShape, num_slots: int, dtype: torch.dtype, devices: list[torch.device]
    ) -> None:
        self.shape = shape
        self.num_slots = num_slots
        dims = (num_slots, shape.num_kv_heads, shape.capacity, shape.head_dim)
        # k[layer]: [S, H_kv, C, D]; each layer on its own device (multi-GPU placement).
        self.k = [torch.zeros(dims, dtype=dtype, device=devices[i]) for i in range(shape.num_layers)]
        self.v = [torch.zeros(dims, dtype=dtype, device=devices[i]) for i in range(shape.num_layers)]

    @property
    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def prefill_view(self, slot: int, start: int) -> _PrefillView:
        return _PrefillView(self, slot, start)

    def decode_view(self, positions: torch.Tensor, length: int) -> _DecodeView:
        return _DecodeView(self, positions, length)

    def copy_slot(self, src: int, dst: int, tokens: int) -> None:
        """Copy the first `tokens` positions of slot src into slot dst (moves and `n` > 1 forks)."""
        if src == dst or tokens <= 0:
            return
        for cache in (self.k, self.v):
            for layer in cache:
                layer[dst, :, :tokens].copy_(layer[src, :, :tokens])


class _PrefillView:
    """past_key_values for one sequence's prompt chunk starting at `start`."""

    def __init__(self, cache: SlotKVCache, slot: int, start: int) -> None:
        self.cache, self.slot, self.start = cache, slot, start

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key/value: [1, H_kv, chunk, D]
        end = self.start + key.shape[2]
        k, v = self.cache.k[layer_idx], self.cache.v[layer_idx]
        k[self.slot, :, self.start : end] = key[0]
        v[self.slot, :, self.start : end] = value[0]
        return k[self.slot : self.slot + 1, :, :end], v[self.slot : self.slot + 1, :, :end]

    # The two queries transformers makes when it builds the causal mask itself.
    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.start

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.start + query_length, 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start


class _DecodeView:
    """past_key_values for one decode step of the sequences in slots 0..B-1."""

    def __init__(self, cache: SlotKVCache, positions: torch.Tensor, length: int) -> None:
        self.cache, self.positions, self.length = cache, positions, length
        self.rows = torch.arange(positions.shape[0], device=positions.device)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key/value: [B, H_kv, 1, D]; written at each row's own position.
        k, v = self.cache.k[layer_idx], self.cache.v[layer_idx]
        rows, pos = self.rows.to(k.device), self.positions.to(k.device)
        k[rows, :, pos] = key[:, :, 0]
        v[rows, :, pos] = value[:, :, 0]
        batch = key.shape[0]
        return k[:batch, :, : self.length], v[:batch, :, : self.length]

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.length - 1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.length, 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length - 1
