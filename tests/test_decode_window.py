"""The CPU decode window (model_runtime/engine/decode_window.py): lane bookkeeping and its attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model_runtime.engine.decode_window import DecodeWindow
from model_runtime.engine.kv_cache import CacheShape

BLOCK = 4
SHAPE = CacheShape(num_layers=2, num_kv_heads=2, head_dim=8)


class Seq:
    """Stands in for a Sequence: the window only keys on its identity."""


def table(first_block: int, tokens: int) -> list[int]:
    return list(range(first_block, first_block + -(-tokens // BLOCK)))


def test_lanes_are_kept_grown_freed_and_refilled() -> None:
    window = DecodeWindow(SHAPE, lanes=2, width=16, dtype=torch.float32)
    a, b, c = Seq(), Seq(), Seq()
    batch, left = window.plan([(a, 0, 5, table(1, 5)), (b, 1, 3, table(5, 3))], BLOCK)
    assert left == [] and batch is not None
    assert batch.lanes.tolist() == [0, 1] and batch.rows.tolist() == [0, 1]
    # New lanes are filled with the whole context, from the pool rows of the block tables.
    assert batch.fill_lanes.tolist() == [0] * 5 + [1] * 3
    assert batch.fill_positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert batch.fill_sources.tolist() == [4, 5, 6, 7, 8, 20, 21, 22]
    assert batch.width == 5 and batch.mask is not None  # b's context is shorter: masked past 3
    assert torch.isinf(batch.mask[2:, 0, 3:]).all() and not torch.isinf(batch.mask[:2]).any()

    # Next step: both grew by one token, only that token is copied; c finds no free lane.
    batch, left = window.plan([(a, 0, 6, table(1, 6)), (b, 1, 4, table(5, 4)), (c, 2, 2, table(9, 2))], BLOCK)
    assert left == [2] and batch is not None
    assert batch.fill_lanes.tolist() == [0, 1] and batch.fill_positions.tolist() == [5, 3]
    assert batch.fill_sources.tolist() == [9, 23]

    # a does not decode this step: its lane goes to c, which is filled from scratch.
    batch, _ = window.plan([(b, 0, 5, table(5, 5)), (c, 1, 3, table(9, 3))], BLOCK)
    assert batch is not None and batch.lanes.tolist() == [1, 0]
    assert batch.fill_lanes.tolist() == [1, 0, 0, 0] and batch.fill_positions.tolist() == [4, 0, 1, 2]
    assert batch.query_rows.tolist() == [1, 0]

    # After a failed forward nothing is trusted: b is refilled from position 0.
    window.reset()
    batch, _ = window.plan([(b, 0, 6, table(5, 6))], BLOCK)
    assert batch is not None and batch.fill_positions.tolist() == list(range(6))
    assert window.plan([], BLOCK) == (None, [])


def test_window_attention_equals_sdpa_over_each_context() -> None:
    """Grouped-query heads, contexts of different lengths, an idle lane among the used ones."""
    torch.manual_seed(0)
    heads, kv_heads, dim, layer = 4, SHAPE.num_kv_heads, SHAPE.head_dim, 1
    window = DecodeWindow(SHAPE, lanes=3, width=16, dtype=torch.float32)
    rows = 64
    k_flat, v_flat = torch.randn(rows, kv_heads, dim), torch.randn(rows, kv_heads, dim)
    first, second, gone = Seq(), Seq(), Seq()
    earlier, _ = window.plan(
        [(first, 0, 3, table(0, 3)), (gone, 1, 2, table(8, 2)), (second, 2, 2, table(4, 2))], BLOCK
    )
    assert earlier is not None
    earlier.attend(layer, torch.randn(1, heads, 3, dim), k_flat, v_flat, 0.3, torch.zeros(1, heads, 3, dim))
    ends = {first: 7, second: 9}
    tables = {first: table(0, 7), second: table(4, 9)}
    # `gone` leaves lane 1 idle between the two; the others fill the rest of their contexts.
    decodes = [(second, 0, ends[second], tables[second]), (first, 1, ends[first], tables[first])]
    batch, left = window.plan(decodes, BLOCK)
    assert batch is not None and left == [] and batch.top == 3
    query = torch.randn(1, heads, 2, dim)
    out = torch.zeros_like(query)
    batch.attend(layer, query, k_flat, v_flat, 0.3, out)
    for _, row, end, blocks in decodes:
        pool_rows = torch.tensor([blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(end)])
        k = k_flat[pool_rows].transpose(0, 1)[None]  # [1, H_kv, L, D]
        v = v_flat[pool_rows].transpose(0, 1)[None]
        expected = F.scaled_dot_product_attention(
            query[:, :, row : row + 1], k, v, scale=0.3, enable_gqa=True
        )
        torch.testing.assert_close(out[:, :, row : row + 1], expected)
