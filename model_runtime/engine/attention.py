"""Attention over the paged KV cache for one packed step: each sequence sees only its own blocks.

A step's tokens (every decode and every prefill chunk) go through the decoder layers as one
[1, T] batch, so the linear layers, which dominate the work, run once for all of them. Only
attention is per sequence. It is plugged into transformers' own attention modules through their
documented extension point (`AttentionInterface.register`): the modules project, normalize and
rotate queries and keys as they always do, then call `paged_attention`, which writes the new keys
and values into the pool and attends each sequence's queries to that sequence's cached context.
Outside the engine (no `packed` argument, e.g. `generate()` in the tests) the modules run PyTorch
SDPA exactly as with attn_implementation="sdpa".

Backend: PyTorch SDPA on every device, one call per sequence over a gathered copy of its context,
causal within the chunk. Why SDPA: it is the only variable-length-capable kernel that runs on every
device PyTorch supports (its CPU flash kernel included) and needs no compilation (FlexAttention
compiles for minutes on a CPU); one call per sequence means no padding and no query ever scoring
another sequence's keys. flash-attn's paged varlen kernel would avoid the gather on NVIDIA GPUs,
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


@dataclass(frozen=True)
class Span:
    """One sequence's part of the packed step."""

    q_start: int  # its queries are rows [q_start, q_end) of the packed tokens
    q_end: int
    position: int  # position of its first query in the sequence
    k_start: int  # its context is rows [k_start, k_end) of the gathered keys; -1: no gather
    k_end: int

    @property
    def fresh(self) -> bool:
        """Nothing cached before this chunk: its own new keys are the whole context."""
        return self.k_start < 0


@dataclass
class PackedBatch:
    """Where each sequence's new tokens go in the pool and which slots hold its context."""

    pool: KVPool
    slot_mapping: torch.Tensor  # [T] long: pool row of each new token
    context_slots: torch.Tensor  # [L] long: pool rows of every gathered context, concatenated
    spans: list[Span]
    _on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot_mapping, context_slots) on `device` (layers may sit on different GPUs)."""
        if device not in self._on:
            self._on[device] = (self.slot_mapping.to(device), self.context_slots.to(device))
        return self._on[device]

    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
    ) -> torch.Tensor:
        # query: [1, H, T, D]; key, value: [1, H_kv, T, D] (rotated); returns [1, T, H, D]
        k_flat, v_flat = self.pool.flat(layer)
        slots, context = self.indices(k_flat.device)
        k_flat.index_copy_(0, slots, key[0].transpose(0, 1).to(k_flat.dtype))
        v_flat.index_copy_(0, slots, value[0].transpose(0, 1).to(v_flat.dtype))
        if context.numel():
            k_all = k_flat.index_select(0, context).permute(1, 0, 2)  # [H_kv, L, D]
            v_all = v_flat.index_select(0, context).permute(1, 0, 2)
        gqa = query.shape[1] != key.shape[1]
        out = torch.empty_like(query)
        for span in self.spans:
            q = query[:, :, span.q_start : span.q_end]
            if span.fresh:
                k = key[:, :, span.q_start : span.q_end]
                v = value[:, :, span.q_start : span.q_end]
                mask, causal = None, span.q_end - span.q_start > 1
            else:
                k = k_all[None, :, span.k_start : span.k_end]
                v = v_all[None, :, span.k_start : span.k_end]
                mask, causal = _chunk_mask(span, query.device), False
            out[:, :, span.q_start : span.q_end] = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=gqa
            )
        return out.transpose(1, 2)


def _chunk_mask(span: Span, device: torch.device) -> torch.Tensor | None:
    """Causal mask of a chunk after `position` cached tokens; None for one query (it sees all)."""
    queries = span.q_end - span.q_start
    if queries == 1:
        return None
    keys = span.k_end - span.k_start
    q_pos = torch.arange(span.position, span.position + queries, device=device)[:, None]
    return torch.arange(keys, device=device)[None, :] <= q_pos  # [q, k]


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
