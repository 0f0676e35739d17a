"""The model runner: turns a step's plan into tensors, runs vision + LM, and samples.

The LLM is transformers' own module (`model.model.language_model`), driven with precomputed input
embeddings, explicit positions and masks, and our slot cache as `past_key_values`. Logits are
computed for the last position of each sequence only.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from model_runtime.engine.kv_cache import SlotKVCache
from model_runtime.engine.sampler import (
    BatchSamplingState,
    apply_penalties,
    compute_logprobs,
    sample,
    token_counts,
)
from model_runtime.engine.scheduler import PrefillChunk
from model_runtime.engine.sequence import Request, Sequence
from model_runtime.engine.vision_cache import VisionFeatureCache
from model_runtime.loading.checkpoint import LoadedCheckpoint


class ModelRunner:
    """Owns the model's forward passes and the cache tensors."""

    def __init__(
        self,
        loaded: LoadedCheckpoint,
        cache: SlotKVCache,
        vision_cache: VisionFeatureCache,
        *,
        max_vision_batch_tiles: int = 64,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.lm = loaded.model.model.language_model
        self.embed = self.lm.get_input_embeddings()
        self.lm_head = loaded.model.get_output_embeddings()
        self.device = self.embed.weight.device
        self.vocab_size = int(self.lm_head.weight.shape[0])
        self.cache = cache
        self.vision_cache = vision_cache
        self.max_vision_batch_tiles = max_vision_batch_tiles

    # -- vision ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_images(self, requests: Seq[Request]) -> None:
        """Fill `features` of every image slot of `requests`, batching all misses in one pass."""
        todo: dict[str, list] = {}
        for request in requests:
            for image in request.images:
                if image.features is not None:
                    continue
                cached = self.vision_cache.get(image.key)
                if cached is not None:
                    image.features, image.pixel_values = cached, None
                else:
                    todo.setdefault(image.key, []).append(image)
        if not todo:
            return
        keys = list(todo)
        pixels = [todo[k][0].pixel_values for k in keys]
        features = self._vision_forward(torch.cat(pixels))  # [sum tiles, T, hidden]
        offset = 0
        for key, pv in zip(keys, pixels, strict=True):
            tiles = pv.shape[0]
            feats = features[offset : offset + tiles].reshape(-1, features.shape[-1])
            offset += tiles
            self.vision_cache.put(key, feats)
            for image in todo[key]:
                image.features, image.pixel_values = feats, None

    def _vision_forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vision_device = next(self.model.model.vision_tower.parameters()).device
        outputs = []
        for start in range(0, pixel_values.shape[0], self.max_vision_batch_tiles):
            chunk = pixel_values[start : start + self.max_vision_batch_tiles].to(
                vision_device, self.loaded.dtype
            )
            out = self.model.model.get_image_features(pixel_values=chunk, return_dict=True)
            outputs.append(out.pooler_output.to(self.device))  # [tiles, T, hidden]
        return torch.cat(outputs)

    # -- language model ----------------------------------------------------------------------------

    def _embed(self, request: Request, start: int, end: int) -> torch.Tensor:
        ids = torch.tensor(request.prompt_ids[start:end], device=self.device)
        embeds = self.embed(ids).unsqueeze(0)  # [1, chunk, hidden]
        if request.images:
            context = torch.tensor(request.prompt_ids, device=self.device) == self.loaded.image_context_id
            in_chunk = context[start:end]
            count = int(in_chunk.sum())
            if count:
                before = int(context[:start].sum())
                features = torch.cat([image.features for image in request.images])
                rows = features[before : before + count].to(embeds.dtype)
                embeds[0, in_chunk] = rows
        return embeds

    @torch.inference_mode()
    def prefill(self, chunk: PrefillChunk) -> torch.Tensor | None:
        """Compute a prompt chunk into the request's base slot; the last logits [1, V] if it completes."""
        request, start, end = chunk.request, chunk.start, chunk.end
        embeds = self._embed(request, start, end)
        positions = torch.arange(start, end, device=self.device).unsqueeze(0)  # [1, chunk]
        if start == 0:
            mask = None  # transformers builds the causal mask itself, exactly as in a fresh forward
        else:
            q = torch.arange(start, end, device=self.device)[:, None]
            k = torch.arange(end, device=self.device)[None, :]
            mask = (k <= q)[None, None]  # [1, 1, chunk, end]
        hidden = self.lm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache.prefill_view(request.base_slot, start),
            use_cache=True,
        ).last_hidden_state
        if not chunk.completes:
            return None
        for image in request.images:  # features are no longer needed once the prompt is cached
            image.features = None
        for sibling in range(1, request.n):
            self.cache.copy_slot(request.base_slot, request.base_slot + sibling, request.prompt_len)
        return self.lm_head(hidden[:, -1])  # [1, V]

    @torch.inference_mode()
    def decode(self, seqs: Seq[Sequence]) -> torch.Tensor:
        """One token for each sequence in slots 0..B-1; returns logits [B, V]."""
        batch = len(seqs)
        last = torch.tensor([s.output_ids[-1] for s in seqs], device=self.device)  # [B]
        positions = torch.tensor([s.num_tokens - 1 for s in seqs], device=self.device)  # [B]
        length = int(positions.max()) + 1
        if batch == 1:
            mask = None  # one sequence needs no padding mask (and matches a plain generate() step)
        else:
            mask = (torch.arange(length, device=self.device)[None, :] <= positions[:, None])[:, None, None, :]
        hidden = self.lm(
            inputs_embeds=self.embed(last).unsqueeze(1),  # [B, 1, hidden]
            attention_mask=mask,
            position_ids=positions.unsqueeze(1),
            past_key_values=self.cache.decode_view(positions, length),
            use_cache=True,
        ).last_hidden_state
        return self.lm_head(hidden[:, -1])  # [B, V]

    # -- sampling ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def sample(self, seqs: Seq[Sequence], logits: torch.Tensor) -> tuple[list[int], list | None]:
        """Next token of each sequence from its logits row; logprobs when any sequence asked."""
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
        tokens = sample(logits, state, [s.generator for s in seqs])
        logprobs = None
        if any(p.logprobs for p in params):
            logprobs = compute_logprobs(raw, tokens, [p.top_logprobs if p.logprobs else 0 for p in params])
        return tokens.tolist(), logprobs

    def copy_slot(self, src: int, dst: int, tokens: int) -> None:
        self.cache.copy_slot(src, dst, tokens)
