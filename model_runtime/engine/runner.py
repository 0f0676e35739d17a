"""The model runner: turns a step's chunks into one packed forward of the LM and samples.

The step's tokens (every decode, every prefill chunk) are embedded as one [1, T] batch, image-context
rows replaced by their images' features, and run through transformers' own decoder layers with
explicit positions; attention is `attention.paged_attention` over the block pool. Logits are
computed only for the last token of each chunk that reaches its sequence's end. Vision work is
`vision.VisionEncoder`'s (self.vision).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from model_runtime.engine import attention
from model_runtime.engine.attention import (
    CPU_GATHER_MAX_CONTEXT,
    DecodeGroup,
    PackedBatch,
    Span,
    contiguous_runs,
    group_decodes,
    padding_mask,
    pool_rows,
)
from model_runtime.engine.cpu_linear import pack_linears
from model_runtime.engine.decode_window import DecodeWindow
from model_runtime.engine.guided import GuidedDecoding
from model_runtime.engine.kv_cache import KVPool
from model_runtime.engine.sampler import (
    BatchSamplingState,
    SampledLogprob,
    apply_logit_bias,
    apply_penalties,
    compute_logprobs,
    sample,
    token_counts,
)
from model_runtime.engine.scheduler import Chunk
from model_runtime.engine.sequence import ImageSlot, Request, Sequence
from model_runtime.engine.vision import VisionEncoder
from model_runtime.engine.vision_cache import VisionFeatureCache
from model_runtime.loading.checkpoint import LoadedCheckpoint

_PROMPT_LOGPROB_ROWS = 256


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [S, V]: the last token of each chunk that samples, in chunk order
    prompt_logprobs: dict[int, list[SampledLogprob]]  # chunk index -> its prompt tokens' logprobs


class _Rotary:
    """Position embeddings for packed tokens of different sequences.

    Every RoPE variant InternVL's LLMs use depends on the position alone, except LongRoPE (Phi-3),
    which switches every position of a forward to its long factors once the sequence outgrows the
    original context. In Phi-3's code (which InternVL2-4B runs) that is decided per forward from the
    largest position, so a prompt longer than the original context is computed with long factors
    throughout, and a generated token at position p uses them once p + 1 exceeds it. Here several
    sequences share a forward, so the choice is made per token by the same rule.
    """

    def __init__(self, lm: torch.nn.Module) -> None:
        self.module = lm.rotary_emb
        rope = lm.config.rope_parameters or {}
        self.original = (
            rope.get("original_max_position_embeddings") if rope.get("rope_type") == "longrope" else None
        )
        if self.original is not None:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            init = ROPE_INIT_FUNCTIONS["longrope"]
            device = self.module.inv_freq.device
            self.short, self.short_scale = init(lm.config, device, seq_len=self.original)
            self.long, self.long_scale = init(lm.config, device, seq_len=self.original + 1)

    def __call__(
        self, hidden: torch.Tensor, positions: torch.Tensor, long_rows: list[bool] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # hidden: [1, T, H]; positions: [T]; returns cos, sin: [1, T, D]
        if self.original is None:
            return self.module(hidden, positions[None])
        pos = positions.to(self.short.device).float()[:, None]
        long = torch.tensor(long_rows, device=pos.device)[:, None]  # [T, 1]
        freqs = torch.where(long, pos * self.long[None], pos * self.short[None])
        scale = torch.where(long, self.long_scale, self.short_scale)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * scale, emb.sin() * scale
        return cos[None].to(hidden.dtype), sin[None].to(hidden.dtype)

    def long_rows(self, chunks: Seq[Chunk]) -> list[bool] | None:
        if self.original is None:
            return None
        rows: list[bool] = []
        for chunk in chunks:
            prompt = chunk.seq.request.prompt_len
            rows.extend(max(prompt, p + 1) > self.original for p in range(chunk.start, chunk.end))
        return rows

    def cache_root(self, prompt_len: int) -> bytes:
        """What the prefix cache must tell apart: prompts computed with short or long factors."""
        if self.original is None:
            return b""
        return b"longrope-long" if prompt_len > self.original else b"longrope-short"


class ModelRunner:
    """Owns the model's forward passes and the KV pool."""

    def __init__(
        self,
        loaded: LoadedCheckpoint,
        pool: KVPool,
        vision_cache: VisionFeatureCache,
        *,
        max_vision_batch_tiles: int = 64,
        window: DecodeWindow | None = None,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.lm = loaded.model.model.language_model
        # The LM's attention modules call attention.paged_attention, which is plain SDPA unless a
        # packed step is passed (generate() on the same model stays what it was).
        self.lm.config._attn_implementation = attention.ATTENTION_NAME
        if loaded.device.type == "cpu":
            pack_linears(loaded.model)
        self.embed = self.lm.get_input_embeddings()
        self.lm_head = loaded.model.get_output_embeddings()
        self.device = self.embed.weight.device
        self.vocab_size = int(self.lm_head.weight.shape[0])
        self.guided = GuidedDecoding(self.vocab_size)
        self.pool = pool
        self.block_size = pool.block_size
        self.window = window
        self.vision = VisionEncoder(
            loaded.model, loaded.dtype, vision_cache, max_batch_tiles=max_vision_batch_tiles
        )
        self.rotary = _Rotary(self.lm)
        self.fault_hook: Callable[[Request], None] | None = None  # tests inject failures here

    # -- language model ----------------------------------------------------------------------------

    def _pack(self, chunks: Seq[Chunk]) -> tuple[torch.Tensor, torch.Tensor, PackedBatch, list[tuple]]:
        size = self.block_size
        # See attention.py: the CPU reads the pool in place, but for short decodes in several runs.
        in_place = self.pool.k[0].device.type == "cpu"
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        new_slots: list[torch.Tensor] = []
        spans: list[Span] = []
        decodes: list[tuple[int, int, list[int]]] = []  # (packed row, context length, blocks): gathered
        images: list[tuple[int, ImageSlot, int, int]] = []  # (packed row, image, first, last feature row)
        short: list[tuple[Sequence, int, int, list[int]]] = []  # decodes for the window
        placed: list[tuple[Sequence, Span]] = []
        for chunk in chunks:
            seq, start, end = chunk.seq, chunk.start, chunk.end
            if self.fault_hook is not None and start < seq.request.prompt_len:
                self.fault_hook(seq.request)
            row = len(ids)
            ids.extend(seq.tokens(start, end))
            positions.append(torch.arange(start, end))
            new_slots.append(pool_rows(seq.block_table, size, start, end))
            span = Span(row, row + end - start, start)
            if self.window is not None and span.decode and end <= self.window.width:
                short.append((seq, row, end, seq.block_table))
            else:
                placed.append((seq, span))
            for image in seq.request.images if start < seq.request.prompt_len else ():
                a, b = max(start, image.start), min(end, image.end)
                if a < b:
                    images.append((row + a - start, image, a - image.start, b - image.start))
        window = None
        if self.window is not None:
            window, left = self.window.plan(short, size)
            placed += [(short[i][0], Span(short[i][1], short[i][1] + 1, short[i][2] - 1)) for i in left]
        for seq, span in placed:
            end = span.position + span.q_end - span.q_start
            context = end if span.decode else span.position
            runs = contiguous_runs(seq.block_table, size, context) if in_place else []
            if in_place and not (span.decode and len(runs) > 1 and end <= CPU_GATHER_MAX_CONTEXT):
                span.runs = runs
                spans.append(span)
            elif span.decode:
                decodes.append((span.q_start, end, seq.block_table[: -(-end // size)]))
            else:
                span.blocks = torch.tensor(seq.block_table[: -(-end // size)]) if span.position > 0 else None
                spans.append(span)
        batch = PackedBatch(pool=self.pool, slot_mapping=torch.cat(new_slots), spans=spans, window=window)
        # On the CPU the gathered decodes are short and a call costs more than its padding: one group.
        lengths = [d[1] for d in decodes]
        groups = [list(range(len(decodes)))] if in_place and decodes else group_decodes(lengths)
        for members in groups:
            width = max(len(decodes[i][2]) for i in members)
            blocks = torch.zeros((len(members), width), dtype=torch.long)  # padding: block 0
            for out, i in zip(blocks, members, strict=True):
                out[: len(decodes[i][2])] = torch.tensor(decodes[i][2])
            mask = padding_mask(torch.tensor([decodes[i][1] for i in members]), width * size, torch.float32)
            mask = None if mask is None else mask[:, None, None, :]
            batch.groups.append(DecodeGroup(torch.tensor([decodes[i][0] for i in members]), blocks, mask))
        return torch.tensor(ids), torch.cat(positions), batch, images

    @torch.inference_mode()
    def forward(self, chunks: Seq[Chunk]) -> ForwardOutput:
        """Compute the chunks in one forward: logits [S, V] for the chunks that sample, in order,
        and the prompt log-probabilities of chunks whose requests ask for them."""
        try:
            return self._forward(chunks)
        except BaseException:
            if self.window is not None:
                self.window.reset()  # a layer may have failed between filling lanes and the next
            raise

    def _forward(self, chunks: Seq[Chunk]) -> ForwardOutput:
        ids, positions, batch, images = self._pack(chunks)
        embeds = self.embed(ids.to(self.device))  # [T, hidden]
        if images:
            rows = torch.cat([torch.arange(r, r + (b - a)) for r, _, a, b in images]).to(self.device)
            features = torch.cat([image.features[a:b] for _, image, a, b in images])
            embeds[rows] = features.to(embeds.dtype)
        hidden = embeds[None]  # [1, T, hidden]
        positions = positions.to(self.device)
        rotary = self.rotary(hidden, positions, self.rotary.long_rows(chunks))
        for layer in self.lm.layers:
            hidden = layer(
                hidden,
                attention_mask=None,
                position_ids=positions[None],
                position_embeddings=rotary,
                packed=batch,
            )
        hidden = self.lm.norm(hidden)
        ends = list(itertools.accumulate(c.end - c.start for c in chunks))
        last = [end - 1 for end, chunk in zip(ends, chunks, strict=True) if chunk.samples]
        logits = self.lm_head(hidden[0, torch.tensor(last, dtype=torch.long, device=hidden.device)])  # [S, V]
        prompt: dict[int, list[SampledLogprob]] = {}
        for index, (end, chunk) in enumerate(zip(ends, chunks, strict=True)):
            request = chunk.seq.request
            if request.scores_prompt and chunk.start < request.prompt_len - 1:
                row = end - (chunk.end - chunk.start)
                prompt[index] = self._prompt_logprobs(hidden[0, row:end], chunk, request)
        return ForwardOutput(logits, prompt)

    def _prompt_logprobs(self, hidden: torch.Tensor, chunk: Chunk, request: Request) -> list[SampledLogprob]:
        """Each prompt token after chunk.start, given what precedes it: row p predicts token p + 1.
        The lm_head runs a slice of rows at a time: a whole 8k-token chunk's logits would take
        gigabytes for a 150k vocabulary."""
        stop = min(chunk.end, request.prompt_len - 1)
        targets = torch.tensor(request.prompt_ids[chunk.start + 1 : stop + 1], device=hidden.device)
        top = request.params.prompt_logprobs or 0
        out: list[SampledLogprob] = []
        for first in range(0, stop - chunk.start, _PROMPT_LOGPROB_ROWS):
            last = min(first + _PROMPT_LOGPROB_ROWS, stop - chunk.start)
            logits = self.lm_head(hidden[first:last])
            out += compute_logprobs(logits, targets[first:last], [top] * (last - first))
        return out

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        self.pool.copy_blocks(copies)

    # -- sampling ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def sample(
        self, seqs: Seq[Sequence], logits: torch.Tensor
    ) -> tuple[list[int], list | None, list[tuple[Sequence, str]]]:
        """Next token of each sequence from its logits row; logprobs when any sequence asked; and
        the sequences whose grammar failed (see GuidedDecoding.apply).

        Order: penalties, logit_bias, grammar masks, then temperature and the filters. Logprobs
        report the model's own distribution (the raw logits), before any of these.
        """
        params = [s.request.params for s in seqs]
        logits = logits.float()
        state = BatchSamplingState.from_params(params, logits.shape[-1], logits.device)
        raw = logits
        if state.any_penalty:
            for s in seqs:
                if s.request.prompt_counts is None:
                    s.request.prompt_counts = token_counts(
                        [s.request.prompt_ids], logits.shape[-1], logits.device
                    )[0]
            prompt_counts = torch.stack([s.request.prompt_counts for s in seqs])
            output_counts = token_counts([s.output_ids for s in seqs], logits.shape[-1], logits.device)
            logits = apply_penalties(
                logits, prompt_counts, output_counts, state.repetition, state.presence, state.frequency
            )
        guided = any(s.matcher is not None for s in seqs)
        if (guided or any(p.logit_bias for p in params)) and logits is raw:
            logits = logits.clone()  # masks and biases must not reach the logprobs
        apply_logit_bias(logits, [p.logit_bias for p in params])
        failed = self.guided.apply(seqs, logits) if guided else []
        tokens = sample(logits, state, [s.generator for s in seqs])
        logprobs = None
        if any(p.logprobs for p in params):
            logprobs = compute_logprobs(raw, tokens, [p.top_logprobs if p.logprobs else 0 for p in params])
        return tokens.tolist(), logprobs, failed
