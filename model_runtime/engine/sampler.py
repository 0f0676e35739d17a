"""The logits -> token step for a batch: small pure torch functions, parameters per row.

Order, as vLLM: penalties on the raw logits, then temperature, top-k, top-p and min-p, then one draw
per row. Greedy rows (temperature 0 or top_k 1) take the argmax of the penalised logits. Each seeded
row draws from its own torch.Generator, so its tokens do not depend on what else is in the batch;
unseeded rows share torch's default generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from model_runtime.sampling_params import SamplingParams


@dataclass(frozen=True)
class BatchSamplingState:
    """Per-row sampling parameters of one decode batch as tensors, plus flags to skip unused steps."""

    temperature: Tensor  # [B] float; 1.0 on greedy rows so dividing is safe
    top_k: Tensor  # [B] long; V where disabled
    top_p: Tensor  # [B] float; 2.0 where disabled
    min_p: Tensor  # [B] float
    repetition: Tensor  # [B] float
    presence: Tensor  # [B] float
    frequency: Tensor  # [B] float
    greedy: Tensor  # [B] bool
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_repetition: bool
    any_presence_frequency: bool

    @classmethod
    def from_params(
        cls, params: Sequence[SamplingParams], vocab_size: int, device: torch.device | str
    ) -> BatchSamplingState:
        """Build all per-row tensors with one host-to-device copy."""
        greedy = [p.greedy for p in params]
        rows = [
            (
                1.0 if g else p.temperature,
                float(p.top_k if 0 < p.top_k < vocab_size else vocab_size),
                # 2.0 rather than 1.0 where off: a float32 cumsum can reach 1.0 before the tail ends.
                p.top_p if p.top_p < 1.0 else 2.0,
                p.min_p,
                p.repetition_penalty,
                p.presence_penalty,
                p.frequency_penalty,
                float(g),
            )
            for p, g in zip(params, greedy, strict=True)
        ]
        table = torch.tensor(rows, dtype=torch.float32).to(device)  # [B, 8]
        sampled = [p for p, g in zip(params, greedy, strict=True) if not g]
        return cls(
            temperature=table[:, 0],
            top_k=table[:, 1].long(),
            top_p=table[:, 2],
            min_p=table[:, 3],
            repetition=table[:, 4],
            presence=table[:, 5],
            frequency=table[:, 6],
            greedy=table[:, 7].bool(),
            all_greedy=not sampled,
            any_top_k=any(0 < p.top_k < vocab_size for p in sampled),
            any_top_p=any(p.top_p < 1.0 for p in sampled),
            any_min_p=any(p.min_p > 0.0 for p in sampled),
            any_repetition=any(p.repetition_penalty != 1.0 for p in params),
            any_presence_frequency=any(p.presence_penalty or p.frequency_penalty for p in params),
        )

    @property
    def any_penalty(self) -> bool:
        return self.any_repetition or self.any_presence_frequency


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A per-request generator; seeds are validated to fit in 64 bits (signed or unsigned)."""
    return torch.Generator(device=device).manual_seed(seed)


def token_counts(token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str) -> Tensor:
    """counts[b, t] = occurrences of token t in token_ids[b]; ids outside [0, V) (virtual ids) are dropped.

    Prompt counts do not change while a sequence decodes: callers should build them once and keep them.
    """
    lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.long)  # [B]
    flat = torch.tensor([t for ids in token_ids for t in ids], dtype=torch.long)  # [N]
    rows = torch.repeat_interleave(torch.arange(len(token_ids)), lengths)  # [N]
    keep = (flat >= 0) & (flat < vocab_size)
    index = (rows[keep] * vocab_size + flat[keep]).to(device)  # [M] positions in the flattened [B, V]
    counts = torch.zeros(len(token_ids) * vocab_size, dtype=torch.int32, device=device)
    counts.index_add_(0, index, torch.ones_like(index, dtype=torch.int32))
    return counts.view(len(token_ids), vocab_size)  # [B, V]


def apply_penalties(
    logits: Tensor,
    prompt_counts: Tensor,
    output_counts: Tensor,
    repetition: Tensor,
    presence: Tensor,
    frequency: Tensor,
) -> Tensor:
    """Penalised copy of logits.

    Repetition (HF semantics) touches every token seen in the prompt or the output: positive logits
    are divided by the penalty, negative ones multiplied. Presence and frequency (OpenAI semantics)
    touch output tokens only: logit -= frequency * count + presence * (count > 0).
    """
    # logits: [B, V]; prompt_counts, output_counts: [B, V] (see token_counts); penalties: [B]
    rep = repetition.unsqueeze(1)  # [B, 1]
    seen = (prompt_counts > 0) | (output_counts > 0)  # [B, V]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    counts = output_counts.to(logits.dtype)
    logits = logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0).to(logits.dtype)
    return logits


def apply_logit_bias(logits: Tensor, biases: Sequence[Sequence[tuple[int, float]]]) -> None:
    """Add each row's (token id, bias) pairs to its logits, in place (OpenAI's logit_bias: -100
    bans a token in practice, 100 all but forces it). Ids beyond the vocabulary were refused earlier."""
    # logits: [B, V]; biases: B lists of pairs
    pairs = [(row, token, bias) for row, items in enumerate(biases) for token, bias in items]
    if not pairs:
        return
    rows, tokens, values = zip(*pairs, strict=True)
    index = (torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device))
    logits.index_put_(index, torch.tensor(values, dtype=logits.dtype, device=logits.device), accumulate=True)


def apply_temperature_top_k_top_p_min_p(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor | None = None,
    top_p: Tensor | None = None,
    min_p: Tensor | None = None,
) -> Tensor:
    """Scaled logits with the tokens each row's filters exclude set to -inf; None skips a filter.

    top_k keeps every token tied with the k-th (as HF). top_p keeps the smallest set of most likely
    tokens whose mass reaches p (always at least the top one). min_p keeps tokens whose probability
    is at least min_p times the top one's.
    """
    # logits: [B, V]; temperature, top_p, min_p: [B] float; top_k: [B] long (V = off)
    logits = logits / temperature.unsqueeze(1)
    if top_k is not None or top_p is not None:
        # Stable descending sort: among equal logits the lowest id comes first, as with argmax.
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [B, V]
        if top_k is not None:
            kth = sorted_logits.gather(1, (top_k - 1).clamp(0, logits.size(1) - 1).unsqueeze(1))  # [B, 1]
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, -math.inf)
        if top_p is not None:
            probs = sorted_logits.softmax(dim=-1)  # [B, V]
            mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
            drop = mass_before >= top_p.unsqueeze(1)
            drop[:, 0] = False
            sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if min_p is not None:
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p); min_p 0 gives -inf, keeping all.
        floor = logits.max(dim=-1, keepdim=True).values + min_p.log().unsqueeze(1)  # [B, 1]
        logits = logits.masked_fill(logits < floor, -math.inf)
    return logits


def sample(logits: Tensor, state: BatchSamplingState, generators: Sequence[torch.Generator | None]) -> Tensor:
    """Next token per row of penalised logits [B, V] -> ids [B] (long)."""
    greedy_ids = logits.argmax(dim=-1)  # [B]; first maximum on ties
    if state.all_greedy:
        return greedy_ids
    filtered = apply_temperature_top_k_top_p_min_p(
        logits.float(),
        state.temperature,
        state.top_k if state.any_top_k else None,
        state.top_p if state.any_top_p else None,
        state.min_p if state.any_min_p else None,
    )
    probs = filtered.softmax(dim=-1)  # [B, V]
    # Exponential race (gpt-fast): argmax(p / q) with q ~ Exp(1) draws from p without a host sync.
    # Each seeded row fills its own q row from its generator, which depends only on its state and V.
    q = torch.empty_like(probs).exponential_()  # [B, V]
    for row, generator in enumerate(generators):
        if generator is not None:
            q[row].exponential_(generator=generator)
    sampled = (probs / q.clamp_min(torch.finfo(q.dtype).tiny)).argmax(dim=-1)  # [B]
    return torch.where(state.greedy, greedy_ids, sampled)


class SampledLogprob(NamedTuple):
    """The chosen token's log-probability and the top alternatives (id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def compute_logprobs(raw_logits: Tensor, token_ids: Tensor, top_n: Sequence[int]) -> list[SampledLogprob]:
    """Log-probabilities of the model's own distribution: log_softmax of the raw logits.

    OpenAI reports the model's probabilities, so penalties, temperature and filters are not applied
    (a greedy or top-k token has its real probability, not 1). One device-to-host copy for the batch.
    """
    # raw_logits: [B, V]; token_ids: [B]; top_n: B ints
    logprobs = raw_logits.float().log_softmax(dim=-1)  # [B, V]
    chosen = logprobs.gather(1, token_ids.long().unsqueeze(1)).squeeze(1)  # [B]
    k = max(top_n, default=0)
    if k:
        top_values, top_ids = logprobs.topk(k, dim=-1)  # [B, k], sorted descending
        top_values_list, top_ids_list = top_values.tolist(), top_ids.tolist()
    else:
        top_values_list = top_ids_list = [[] for _ in top_n]
    return [
        SampledLogprob(tok, lp, tuple(zip(ids[:n], values[:n], strict=True)))
        for tok, lp, ids, values, n in zip(
            token_ids.tolist(), chosen.tolist(), top_ids_list, top_values_list, top_n, strict=True
        )
    ]
