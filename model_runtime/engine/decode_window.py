"""CPU: the contexts of short decodes kept dense, so one step attends all of them in one batched matmul.

On a GPU, gathering a decode's blocks into a contiguous copy is nearly free; on a CPU it is not.
Thirty-two decodes of ~170 tokens took ~3 ms a layer to attend through the paged pool (measured on
the `small` model, 2 cores): 1.1 ms to gather their blocks and 1.9 ms for the masked SDPA call over
the gathered copy; attended run by run in place instead, 32 flash-attention calls cost about as
much, in call overhead rather than work. That was 40% of a step.

So each short decode (context of at most `width` tokens) gets a lane: rows of per-layer tensors
[lanes, H_kv, width, D] that hold a copy of its keys and values, laid out as a batched matmul
wants them. A lane is filled from the pool once, when the sequence gets it, and then grows by the
one token the sequence computes each step: there is no per-step gather. The pool stays the only
source of truth (prefix caching, copy-on-write and preemption work on it alone): a lane is
dropped whenever its sequence does not decode in a step, outgrows the window, or a forward
fails, and is refilled from the pool if needed. Lanes are allocated once at start-up, beside the
pool; their memory is reported with the cache's. Decodes beyond the lanes' number take the pool
paths (attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from model_runtime.engine.attention import padding_mask, pool_rows
from model_runtime.engine.kv_cache import CacheShape

# Lanes and their width when the engine sizes them (engine.py): contexts up to this many tokens,
# at most this share of the KV cache's budget on top of it.
WINDOW_TOKENS = 256
WINDOW_BUDGET_SHARE = 0.25


@dataclass
class WindowBatch:
    """A step's decodes attended in the window: which lane each uses, where each one's query is
    in the packed tokens, what to copy from the pool into the lanes first, and the mask."""

    window: DecodeWindow
    top: int  # lanes [0, top) are attended; idle ones among them are computed and ignored
    width: int  # the longest context among them: columns [0, width) are attended
    lanes: torch.Tensor  # [n] long: lane of each decode
    rows: torch.Tensor  # [n] long: its row in the packed tokens
    query_rows: torch.Tensor  # [top] long: packed row whose query each lane takes (0 for idle lanes)
    fill_lanes: torch.Tensor  # [F] long: lane of each token copied in from the pool this step
    fill_positions: torch.Tensor  # [F] long: its position in the lane
    fill_sources: torch.Tensor  # [F] long: its pool row
    mask: torch.Tensor | None  # [top * H_kv, 1, width] additive: -inf past each context; None if all full

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        k_flat: torch.Tensor,
        v_flat: torch.Tensor,
        scaling: float | None,
        out: torch.Tensor,
    ) -> None:
        """Attend the decodes in `layer`, after their new keys and values are in the pool.

        query, out: [1, H, T, D] (the packed step's); k_flat, v_flat: the pool's [rows, H_kv, D].
        """
        k, v = self.window.k[layer], self.window.v[layer]  # [lanes, H_kv, width, D]
        if self.fill_lanes.numel():
            k[self.fill_lanes, :, self.fill_positions] = k_flat.index_select(0, self.fill_sources)
            v[self.fill_lanes, :, self.fill_positions] = v_flat.index_select(0, self.fill_sources)
        top, width = self.top, self.width
        heads, kv_heads, dim = query.shape[1], k.shape[1], k.shape[3]
        groups = heads // kv_heads
        # [top, H, D] -> [top * H_kv, G, D]: a KV head's query heads attend to it as one self.
        q = query[0][:, self.query_rows].transpose(0, 1).reshape(top * kv_heads, groups, dim)
        keys = k[:top, :, :width].reshape(top * kv_heads, width, dim)  # a view: lanes are dense
        values = v[:top, :, :width].reshape(top * kv_heads, width, dim)
        scale = dim**-0.5 if scaling is None else scaling
        if self.mask is None:
            scores = torch.bmm(q, keys.transpose(1, 2)).mul_(scale)
        else:
            scores = torch.baddbmm(self.mask, q, keys.transpose(1, 2), alpha=scale)
        probs = scores.float().softmax(dim=-1).to(q.dtype)
        o = torch.bmm(probs, values).view(top, heads, dim)  # [top, H, D]
        out[0][:, self.rows] = o[self.lanes].transpose(0, 1)


class DecodeWindow:
    """The lanes of every layer and which sequence holds which lane."""

    def __init__(self, shape: CacheShape, lanes: int, width: int, dtype: torch.dtype) -> None:
        self.num_lanes = lanes
        self.width = width
        self.dtype = dtype
        self.kv_heads = shape.num_kv_heads
        dims = (lanes, shape.num_kv_heads, width, shape.head_dim)
        self.k = [torch.zeros(dims, dtype=dtype) for _ in range(shape.num_layers)]
        self.v = [torch.zeros(dims, dtype=dtype) for _ in range(shape.num_layers)]
        # id(seq) -> (seq, lane, tokens held). The sequence itself is kept so that its id cannot be
        # reused by a new one while its entry exists.
        self._owners: dict[int, tuple[Any, int, int]] = {}

    @property
    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reset(self) -> None:
        """Forget every lane's contents (after a failed forward, some layers may lack a token)."""
        self._owners.clear()

    def plan(
        self, decodes: list[tuple[Any, int, int, list[int]]], block_size: int
    ) -> tuple[WindowBatch | None, list[int]]:
        """Lanes for this step's short decodes, each (sequence, packed row, context end, block
        table), in order; returns the batch and the indices of the decodes left without a lane.

        Sequences holding a lane keep it; lanes of sequences not decoding now are freed first.
        """
        present = {id(seq) for seq, _, _, _ in decodes}
        for key in [key for key in self._owners if key not in present]:
            del self._owners[key]
        taken = {lane for _, lane, _ in self._owners.values()}
        free = sorted(set(range(self.num_lanes)) - taken, reverse=True)  # popped lowest first
        lanes: list[int] = []
        rows: list[int] = []
        ends: list[int] = []
        fills: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] = ([], [], [])
        left: list[int] = []
        for index, (seq, row, end, table) in enumerate(decodes):
            entry = self._owners.get(id(seq))
            if entry is None:
                if not free:
                    left.append(index)
                    continue
                lane, held = free.pop(), 0
            else:
                _, lane, held = entry
                if held >= end:  # not a continuation of what the lane holds: refill it
                    held = 0
            self._owners[id(seq)] = (seq, lane, end)
            if held < end:
                fills[0].append(torch.full((end - held,), lane, dtype=torch.long))
                fills[1].append(torch.arange(held, end))
                fills[2].append(pool_rows(table, block_size, held, end))
            lanes.append(lane)
            rows.append(row)
            ends.append(end)
        if not lanes:
            return None, left
        top, width = max(lanes) + 1, max(ends)
        query_rows = torch.zeros(top, dtype=torch.long)
        query_rows[lanes] = torch.tensor(rows)
        lengths = torch.full((top,), width)  # idle lanes: attend to whatever they hold, ignored
        lengths[lanes] = torch.tensor(ends)
        mask = padding_mask(lengths, width, self.dtype)
        if mask is not None:
            mask = mask.repeat_interleave(self.kv_heads, dim=0)[:, None, :]  # one row per (lane, KV head)
        empty = torch.empty(0, dtype=torch.long)
        batch = WindowBatch(
            self,
            top,
            width,
            torch.tensor(lanes),
            torch.tensor(rows),
            query_rows,
            *(torch.cat(parts) if parts else empty for parts in fills),
            mask,
        )
        return batch, left
