"""Attention over the paged KV cache for one packed step: each sequence sees only its own blocks.

A step's tokens (every decode and every prefill chunk) go through the decoder layers as one
[1, T] batch, so the linear layers, which dominate the work, run once for all of them. Only
attention is per sequence. It is plugged into transformers' own attention modules through their
documented extension point (`AttentionInterface.register`): the modules project, normalize and
rotate queries and keys as they always do, then call `paged_attention`, which writes the new keys
and values into the pool and attends each sequence's queries to that sequence's cached context.
Outside the engine (no `packed` argument, e.g. `generate()` in the tests) the modules run PyTorch
SDPA exactly as with attn_implementation="sdpa".

Kernels, chosen per device:

- CPU: PyTorch's CPU flash-attention kernel, called on the pool *in place*. The block allocator
  keeps a sequence's blocks in contiguous runs where it can, and each run is a strided view of
  the pool that the kernel reads directly; a context in several runs (a shared cached prefix,
  then the sequence's own blocks) is attended run by run and the parts merged by their
  log-sum-exps, as flash-decoding does. Nothing is copied: at long contexts a copy of the keys
  and values read three times the memory the attention itself needs (measured: 16 decodes of
  3,400 tokens, 97 ms a layer gathered, 17 ms in place). Grouped-query attention is handled by
  folding each KV head's query heads into the query axis, so the keys are never repeated either.
  Short decodes in several runs are the exception: there the calls, not the bytes, cost, and
  decodes of up to CPU_GATHER_MAX_CONTEXT tokens are gathered and batched as on other devices
  (32 decodes of ~110 tokens in 3 runs: 5.7 ms a layer in place, 1.6 ms gathered; at ~300
  tokens 7.8 and 7.0 ms; at ~600, 11.5 and 47 ms).
- other devices (CUDA): PyTorch SDPA over gathered copies of each context: a prefill chunk gets a
  call of its own (causal after its cached part); decodes are grouped by context length, one
  batched call per group, padded to its longest context by at most MAX_DECODE_PADDING of its
  keys. GPU memory makes the copies cheap; flash-attn's paged varlen kernel would avoid them, but
  no GPU test has run it yet, so it is not offered (see the README's GPU section).

Why SDPA rather than FlexAttention or flash-attn: it runs on every device PyTorch supports and
needs no compilation (FlexAttention compiles for minutes on a CPU); no query ever scores another
sequence's keys, and no decode is padded on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from model_runtime.engine.kv_cache import KVPool

if TYPE_CHECKING:  # decode_window builds on this module's helpers
    from model_runtime.engine.decode_window import WindowBatch

ATTENTION_NAME = "internvl_paged"
# On devices other than the CPU, decodes of similar context length share one SDPA call, padded to
# the group's longest context; a group grows while its padding stays under this share of its keys.
MAX_DECODE_PADDING = 0.125
# On the CPU, decodes whose context is in several runs and at most this long are gathered and
# batched like that (see the module docstring); longer ones are read in place.
CPU_GATHER_MAX_CONTEXT = 256


@dataclass
class Span:
    """One sequence's chunk: its queries, and where its context before the chunk lies.

    `runs` (CPU): pool rows [a, b) holding, in order, the context the chunk's queries all see
    (positions before the chunk; for a decode also its own token, already written). `blocks`
    (other devices): the blocks holding the context up to the chunk's end, to gather.
    """

    q_start: int  # its queries are rows [q_start, q_end) of the packed tokens
    q_end: int
    position: int  # position of its first query in the sequence
    runs: list[tuple[int, int]] = field(default_factory=list)
    blocks: torch.Tensor | None = None

    @property
    def decode(self) -> bool:
        return self.q_end - self.q_start == 1 and self.position > 0


@dataclass
class DecodeGroup:
    """Decodes attended in one call (not on the CPU): their rows in the packed tokens, the blocks
    of each one's context padded to the group's longest (padding is the reserved block 0), and an
    additive mask that hides the padding (None when all contexts are equally long)."""

    rows: torch.Tensor  # [B] long
    blocks: torch.Tensor  # [B, nb] long
    mask: torch.Tensor | None  # [B, 1, 1, nb * block_size] float, 0 or -inf


def group_decodes(lengths: list[int]) -> list[list[int]]:
    """Indices of decodes grouped by context length, padding of each group under MAX_DECODE_PADDING."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    total = 0
    for index in order:
        length = lengths[index]
        if groups:
            group = groups[-1]
            keys = total + length
            if length * (len(group) + 1) - keys <= MAX_DECODE_PADDING * keys:
                group.append(index)
                total = keys
                continue
        groups.append([index])
        total = length
    return groups


def pool_rows(table: list[int], block_size: int, start: int, end: int) -> torch.Tensor:
    """Pool rows [n] long of a sequence's tokens [start, end), from its block table."""
    first, last = start // block_size, (end - 1) // block_size + 1
    blocks = torch.tensor(table[first:last], dtype=torch.long)
    rows = (blocks[:, None] * block_size + torch.arange(block_size)[None, :]).view(-1)
    return rows[start - first * block_size : end - first * block_size]


def padding_mask(lengths: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive mask [n, width] hiding each row's keys past its length (0 or -inf); None when no
    row is shorter than `width`."""
    if not bool((lengths != width).any()):
        return None
    hidden = torch.arange(width)[None, :] >= lengths[:, None]
    return torch.zeros(hidden.shape, dtype=dtype).masked_fill(hidden, float("-inf"))


def contiguous_runs(table: list[int], block_size: int, tokens: int) -> list[tuple[int, int]]:
    """Pool rows of a sequence's first `tokens` tokens, as maximal runs of consecutive rows."""
    runs: list[tuple[int, int]] = []
    for index in range(-(-tokens // block_size)):
        start = table[index] * block_size
        end = start + min(block_size, tokens - index * block_size)
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return runs


@dataclass
class PackedBatch:
    """Where each sequence's new tokens go in the pool and where its context is."""

    pool: KVPool
    slot_mapping: torch.Tensor  # [T] long: pool row of each new token
    spans: list[Span]
    groups: list[DecodeGroup] = field(default_factory=list)
    window: WindowBatch | None = None  # CPU: short decodes attended in the decode window
    _on: dict[tuple[torch.device, torch.dtype], PackedBatch] = field(default_factory=dict)

    def on(self, device: torch.device, dtype: torch.dtype) -> PackedBatch:
        """This batch's tensors on `device`, masks in `dtype` (layers may sit on different GPUs)."""
        key = (device, dtype)
        if key not in self._on:
            move = lambda t: None if t is None else t.to(device)  # noqa: E731
            self._on[key] = PackedBatch(
                self.pool,
                self.slot_mapping.to(device),
                [Span(s.q_start, s.q_end, s.position, s.runs, move(s.blocks)) for s in self.spans],
                [
                    DecodeGroup(
                        g.rows.to(device),
                        g.blocks.to(device),
                        None if g.mask is None else g.mask.to(device, dtype),
                    )
                    for g in self.groups
                ],
            )
        return self._on[key]

    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
    ) -> torch.Tensor:
        # query: [1, H, T, D]; key, value: [1, H_kv, T, D] (rotated); returns [1, T, H, D]
        k_flat, v_flat = self.pool.flat(layer)  # [rows, H_kv, D]
        batch = self.on(k_flat.device, query.dtype)
        k_flat.index_copy_(0, batch.slot_mapping, key[0].transpose(0, 1).to(k_flat.dtype))
        v_flat.index_copy_(0, batch.slot_mapping, value[0].transpose(0, 1).to(v_flat.dtype))
        out = torch.empty_like(query)
        in_place = k_flat.device.type == "cpu"
        if self.window is not None:
            self.window.attend(layer, query, k_flat, v_flat, scaling, out)
        self._attend_gathered(batch, layer, query, key, value, scaling, out, spans=not in_place)
        if in_place:
            for span in batch.spans:
                out[:, :, span.q_start : span.q_end] = _attend_in_place(
                    span, query, key, value, k_flat, v_flat, scaling
                )
        return out.transpose(1, 2)

    def _attend_gathered(
        self,
        batch: PackedBatch,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
        out: torch.Tensor,
        *,
        spans: bool,
    ) -> None:
        """The grouped decodes, each group's contexts gathered and attended in one call; with
        `spans`, the spans (prefill chunks) too, each over a gathered copy of its context."""
        k_pool, v_pool = self.pool.k[layer], self.pool.v[layer]  # [blocks, block_size, H_kv, D]
        heads, dim = k_pool.shape[2:]
        gqa = query.shape[1] != key.shape[1]
        for group in batch.groups:
            n = group.blocks.shape[0]
            # Whole blocks (far cheaper than gathering rows), viewed as [B, H_kv, L, D].
            k, v = self.pool.gather(layer, group.blocks.view(-1))
            k, v = k.view(n, -1, heads, dim).transpose(1, 2), v.view(n, -1, heads, dim).transpose(1, 2)
            q = query[0][:, group.rows].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask, scale=scaling, enable_gqa=gqa)
            out[0][:, group.rows] = o.squeeze(2).transpose(0, 1)
        if not spans:
            return
        for span in batch.spans:
            q = query[:, :, span.q_start : span.q_end]
            if span.blocks is None:
                k = key[:, :, span.q_start : span.q_end]
                v = value[:, :, span.q_start : span.q_end]
                mask, causal = None, span.q_end - span.q_start > 1
            else:
                length = span.position + span.q_end - span.q_start
                k = k_pool.index_select(0, span.blocks).view(-1, heads, dim)[:length].transpose(0, 1)[None]
                v = v_pool.index_select(0, span.blocks).view(-1, heads, dim)[:length].transpose(0, 1)[None]
                mask, causal = _chunk_mask(span, query.device), False
            out[:, :, span.q_start : span.q_end] = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=gqa
            )


def _chunk_mask(span: Span, device: torch.device) -> torch.Tensor:
    """Causal mask [q, k] of a chunk whose first query sits at `position`."""
    queries = span.q_end - span.q_start
    q_pos = torch.arange(span.position, span.position + queries, device=device)[:, None]
    return torch.arange(span.position + queries, device=device)[None, :] <= q_pos


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _attend_in_place(
    span: Span,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_flat: torch.Tensor,
    v_flat: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """One span's attention on the CPU, reading the pool in place (see the module docstring)."""
    q = query[:, :, span.q_start : span.q_end]  # [1, H, q, D]
    heads, kv_heads = query.shape[1], key.shape[1]
    groups, length = heads // kv_heads, q.shape[2]
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    if span.runs:
        # [1, H, q, D] -> [1, H_kv, G * q, D]: a KV head's query heads attend to it as one batch.
        folded = q.reshape(1, kv_heads, groups * length, q.shape[-1])
        for start, end in span.runs:
            k = k_flat[start:end].transpose(0, 1)[None]  # [1, H_kv, L, D], a view of the pool
            v = v_flat[start:end].transpose(0, 1)[None]
            o, lse = _flash_cpu(folded, k, v, scale=scaling)[:2]
            parts.append((o.reshape(1, heads, length, -1), lse.reshape(1, heads, length)))
    if not span.decode:  # the chunk's own keys, causally (a decode's own key is in its last run)
        k, v = key[:, :, span.q_start : span.q_end], value[:, :, span.q_start : span.q_end]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        o, lse = _flash_cpu(q, k, v, is_causal=True, scale=scaling)[:2]
        parts.append((o, lse))
    if len(parts) == 1:
        return parts[0][0]
    # Each part is softmax-normalized over its keys; weight it by its share of the total mass.
    lses = torch.stack([lse for _, lse in parts])  # [P, 1, H, q]
    weights = (lses - lses.amax(dim=0, keepdim=True)).exp()
    merged = sum(o * w[..., None] for (o, _), w in zip(parts, weights, strict=True))
    return (merged / weights.sum(dim=0)[..., None]).to(query.dtype)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract; see the module docstring."""
    packed: PackedBatch | None = kwargs.pop("packed", None)
    if packed is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    return packed.attend(module.layer_idx, query, key, value, scaling), None


AttentionInterface.register(ATTENTION_NAME, paged_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
