"""Attention over the paged KV cache for one packed step: each sequence sees only its own blocks.

A step's tokens (every decode and every prefill chunk) go through the decoder layers as one
[1, T] batch, so the linear layers, which dominate the work, run once for all of them. Only
attention is per sequence. It is plugged into transformers' own attention modules through their
documented extension point (`AttentionInterface.register`): the modules project, normalize and
rotate queries and keys as they always do, then call `paged_attention`, which writes the new keys
and values into the pool and attends each sequence's queries to that sequence's cached context.
Outside the engine (no `packed` argument, e.g. `generate()` in the tests) the modules run PyTorch
SDPA exactly as with attn_implementation="sdpa".

Backend: PyTorch SDPA on every device, over gathered copies of each sequence's context. A
multi-token chunk (prefill) gets a call of its own, causal within the chunk; decodes (one query
each) are grouped by context length and each group is one batched call, padded to its longest
context but never by more than MAX_DECODE_PADDING of its keys (one call per decode would cost
more in call overhead than the attention itself). Why SDPA: it is the only variable-length-capable
kernel that runs on every device PyTorch supports (its CPU flash kernel included) and needs no
compilation (FlexAttention compiles for minutes on a CPU); no query ever scores another
sequence's keys. flash-attn's paged varlen kernel would avoid the gather on NVIDIA GPUs,
but no GPU test has run it yet, so it is not offered (see the README's GPU section).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from model_runtime.engine.kv_cache import KVPool

ATTENTION_NAME = "internvl_paged"


# Decodes of similar context length share one SDPA call, padded to the group's longest context; a
# group grows while its padding stays under this share of its keys.
MAX_DECODE_PADDING = 0.125


@dataclass
class Span:
    """A multi-token chunk of one sequence: its queries and, unless it starts the sequence, the
    blocks that hold its whole context (cached tokens and its own)."""

    q_start: int  # its queries are rows [q_start, q_end) of the packed tokens
    q_end: int
    position: int  # position of its first query in the sequence
    blocks: torch.Tensor | None  # [ceil((position + queries) / block_size)] long; None: nothing cached


@dataclass
class DecodeGroup:
    """Single-token chunks (decodes) attended in one call: their rows in the packed tokens, the
    blocks of each one's context padded to the group's longest (padding is the reserved block 0),
    and an additive mask that hides the padding (None when all contexts are equally long)."""

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


@dataclass
class PackedBatch:
    """Where each sequence's new tokens go in the pool and which blocks hold its context."""

    pool: KVPool
    slot_mapping: torch.Tensor  # [T] long: pool row of each new token
    spans: list[Span]
    groups: list[DecodeGroup]
    _on: dict[tuple[torch.device, torch.dtype], PackedBatch] = field(default_factory=dict)

    def on(self, device: torch.device, dtype: torch.dtype) -> PackedBatch:
        """This batch's tensors on `device`, masks in `dtype` (layers may sit on different GPUs)."""
        key = (device, dtype)
        if key not in self._on:
            move = lambda t: None if t is None else t.to(device)  # noqa: E731
            self._on[key] = PackedBatch(
                self.pool,
                self.slot_mapping.to(device),
                [Span(s.q_start, s.q_end, s.position, move(s.blocks)) for s in self.spans],
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
        k_pool, v_pool = self.pool.k[layer], self.pool.v[layer]  # [blocks, block_size, H_kv, D]
        batch = self.on(k_pool.device, query.dtype)
        k_flat, v_flat = self.pool.flat(layer)
        k_flat.index_copy_(0, batch.slot_mapping, key[0].transpose(0, 1).to(k_flat.dtype))
        v_flat.index_copy_(0, batch.slot_mapping, value[0].transpose(0, 1).to(v_flat.dtype))
        heads, dim = k_pool.shape[2:]
        gqa = query.shape[1] != key.shape[1]
        out = torch.empty_like(query)
        for group in batch.groups:
            n, width = group.blocks.shape
            # Whole blocks by index_select (far cheaper than gathering rows), viewed as [B, H_kv, L, D].
            k = k_pool.index_select(0, group.blocks.view(-1)).view(n, -1, heads, dim).transpose(1, 2)
            v = v_pool.index_select(0, group.blocks.view(-1)).view(n, -1, heads, dim).transpose(1, 2)
            q = query[0][:, group.rows].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask, scale=scaling, enable_gqa=gqa)
            out[0][:, group.rows] = o.squeeze(2).transpose(0, 1)
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
        return out.transpose(1, 2)


def _chunk_mask(span: Span, device: torch.device) -> torch.Tensor:
    """Causal mask [q, k] of a chunk whose first query sits at `position`."""
    queries = span.q_end - span.q_start
    q_pos = torch.arange(span.position, span.position + queries, device=device)[:, None]
    return torch.arange(span.position + queries, device=device)[None, :] <= q_pos


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
