"""The engine: step() = schedule -> run -> postprocess, on the thread that owns the model.

Failures are contained where they can be attributed: a step's packed forward that raises is rerun
one request at a time (rewriting the same keys and values is harmless), so only the request at
fault fails; a vision batch that raises is retried per image. A device error that leaves the
device unusable (anything but out-of-memory on CUDA) marks the engine dead.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import time
from collections.abc import Callable

import torch

from model_runtime.config import EngineConfig
from model_runtime.engine.block_manager import KVCacheManager
from model_runtime.engine.decode_window import WINDOW_BUDGET_SHARE, WINDOW_TOKENS, DecodeWindow
from model_runtime.engine.detokenizer import IncrementalDetokenizer
from model_runtime.engine.guided import GuidedDecoding
from model_runtime.engine.kv_cache import CacheShape, KVPool, blocks_for_budget
from model_runtime.engine.runner import ForwardOutput, ModelRunner
from model_runtime.engine.sampler import make_generator
from model_runtime.engine.scheduler import Chunk, Scheduler, StepCostModel, StepPlan, attention_pairs
from model_runtime.engine.sequence import Request, Sequence
from model_runtime.engine.vision_cache import VisionFeatureCache
from model_runtime.errors import RequestFailedError
from model_runtime.loading.checkpoint import LoadedCheckpoint
from model_runtime.request import (
    ITERATION_TOKEN_BUCKETS,
    CompletionDelta,
    EngineStats,
    FinishedRequestStats,
    PromptLogprobs,
    RequestOutput,
    TokenLogprob,
)
from model_runtime.structured.tokenizer import Vocabulary

log = logging.getLogger(__name__)

CPU_DEFAULT_CACHE_GIB = 2.0
GPU_CACHE_FRACTION = 0.85  # of the memory left free after the model is loaded
# Tiles per vision-tower forward. On a CPU one tile at a time is fastest: its activations stay in
# cache (the small benchmark model: 79 ms a tile alone, 89-93 ms in batches of 2-16).
VISION_BATCH_TILES_CPU = 1
VISION_BATCH_TILES_GPU = 64
# Tiles a step may encode when no sequence is decoding (nothing waits on it but the images' own
# requests, so the bound only keeps new arrivals from waiting behind a long vision step).
MAX_STEP_TILES = {"cpu": 16, "cuda": 128}
# While sequences decode and the setting leaves the step time to the engine, a step with prefill or
# vision work may take 3x what a decode-only step takes, but at least this (on the small benchmark
# model a CPU step of four decodes takes ~12 ms, a vision tile ~80 ms, encoded in slices across
# steps; the stall goal's worst gap over the quiet one: 10.6x at 75 ms, 6.9x at 45, 8.9x at 35,
# where slices no longer fit the budget and the forced ones overrun it).
STEP_FLOOR_MS = {"cpu": 45.0, "cuda": 30.0}
# With nothing decoding, a step may take this long: a request arriving meanwhile waits about that
# long to start, while a long prompt's chunks stay large enough that per-step overhead is small.
STEP_IDLE_MS = {"cpu": 250.0, "cuda": 100.0}
RESERVE_FRACTION = 0.01  # of the blocks kept free at admission, for decodes to grow into


class FatalEngineError(RuntimeError):
    """The device is in an unknown state; the process must be restarted."""


def _is_fatal(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA error" in text or "device-side assert" in text)


def cache_budget_bytes(config: EngineConfig, device: torch.device) -> int:
    if config.kv_cache_memory_gib is not None:
        return int(config.kv_cache_memory_gib * 2**30)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_CACHE_FRACTION)
    return int(CPU_DEFAULT_CACHE_GIB * 2**30)


def _decode_window(
    shape: CacheShape, dtype: torch.dtype, budget: int, max_seqs: int, devices: list[torch.device]
) -> DecodeWindow | None:
    """The CPU's decode window (decode_window.py): a lane per running sequence where that fits in
    WINDOW_BUDGET_SHARE of the KV cache's budget, allocated beside the pool."""
    if any(device.type != "cpu" for device in devices):
        return None
    lane_bytes = WINDOW_TOKENS * shape.bytes_per_token(dtype)
    lanes = min(max_seqs, int(budget * WINDOW_BUDGET_SHARE) // lane_bytes)
    return DecodeWindow(shape, lanes, WINDOW_TOKENS, dtype) if lanes > 0 else None


class Engine:
    """Synchronous engine; the worker calls add/abort/step from its own thread."""

    def __init__(self, loaded: LoadedCheckpoint, config: EngineConfig) -> None:
        self.config = config
        text = loaded.model.config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        shape = CacheShape(text.num_hidden_layers, text.num_key_value_heads, head_dim)
        size = config.block_size
        budget = cache_budget_bytes(config, loaded.device)
        num_blocks = blocks_for_budget(shape, loaded.dtype, budget, size)
        reserve = max(1, int(RESERVE_FRACTION * num_blocks))
        fits = (num_blocks - 1 - reserve) * size  # the longest sequence the pool always holds
        if fits < 2 * size:
            raise ValueError(
                f"the KV cache holds only {num_blocks} blocks of {size} tokens; raise --kv-cache-memory-gib"
            )
        if loaded.max_model_len > fits:
            if config.max_model_len is not None:
                raise ValueError(
                    f"max_model_len {config.max_model_len} does not fit in the KV cache, which holds "
                    f"{fits} tokens; lower --max-model-len or raise --kv-cache-memory-gib"
                )
            log.info(
                "max_model_len %d (the model allows %d; the KV cache holds %d tokens)",
                fits,
                loaded.max_model_len,
                fits,
            )
            loaded.max_model_len = fits
        self.loaded = loaded
        layers = loaded.model.model.language_model.layers
        devices = [next(layer.parameters()).device for layer in layers]
        self.pool = KVPool(shape, num_blocks, size, loaded.dtype, devices)
        self.window = _decode_window(shape, loaded.dtype, budget, config.max_num_seqs, devices)
        self.kv = KVCacheManager(num_blocks, size, prefix_caching=config.enable_prefix_caching)
        self.vision_cache = VisionFeatureCache(config.vision_cache_mib * 2**20)
        vocab_size = int(loaded.model.get_output_embeddings().weight.shape[0])
        self.vocabulary = Vocabulary(loaded.tokenizer, vocab_size, loaded.stop_token_ids)
        kind = "cuda" if loaded.device.type == "cuda" else "cpu"
        vision_batch = VISION_BATCH_TILES_GPU if kind == "cuda" else VISION_BATCH_TILES_CPU
        self.runner = ModelRunner(
            loaded, self.pool, self.vision_cache, max_vision_batch_tiles=vision_batch, window=self.window
        )
        target = None if config.step_time_target_ms is None else config.step_time_target_ms / 1000
        self.cost = StepCostModel(
            target,
            floor_s=STEP_FLOOR_MS[kind] / 1000,
            idle_target_s=STEP_IDLE_MS[kind] / 1000,
            max_tokens=config.max_num_batched_tokens,
            max_tiles=MAX_STEP_TILES[kind],
        )
        self.scheduler = Scheduler(
            self.kv,
            self.cost,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=max(config.max_num_batched_tokens, config.max_num_seqs),
            max_model_len=loaded.max_model_len,
            max_waiting=config.max_waiting,
            reserve_blocks=reserve,
            vision_stages=self.runner.vision.stages,
            vision_stage_shares=self.runner.vision.stage_shares,
        )
        self.requests: dict[str, Request] = {}
        # For metrics: multimodal-cache queries and hits (images and video frames, each counted once
        # per request), and tokens computed per step as counts per ITERATION_TOKEN_BUCKETS bound.
        self.mm_cache_queries = 0
        self.mm_cache_hits = 0
        self.iteration_tokens = [0] * (len(ITERATION_TOKEN_BUCKETS) + 1)
        self.iteration_tokens_sum = 0
        # Unseeded sampling draws from torch's default generator; seeding it makes a server run repeatable.
        torch.manual_seed(config.seed)
        log.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB), %d bytes per token; prefix caching %s",
            num_blocks - 1,
            size,
            self.kv.capacity_tokens,
            self.pool.total_bytes / 2**20,
            shape.bytes_per_token(loaded.dtype),
            "on" if config.enable_prefix_caching else "off",
        )
        if self.window is not None:
            log.info(
                "decode window: %d lanes of %d tokens (%.1f MiB) for short decodes",
                self.window.num_lanes,
                self.window.width,
                self.window.total_bytes / 2**20,
            )

    @property
    def fault_hook(self) -> Callable[[Request], None] | None:
        return self.runner.fault_hook

    @fault_hook.setter
    def fault_hook(self, hook: Callable[[Request], None] | None) -> None:
        self.runner.fault_hook = hook  # tests inject failures into the forward this way

    # -- requests ----------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Admit a prepared request to the waiting queue (raises PromptTooLongError / QueueFullError)."""
        try:
            self._admit(request)
        except Exception:
            request.release()  # refused: its pixels go now, whoever still holds the request
            raise
        self.requests[request.request_id] = request

    def _admit(self, request: Request) -> None:
        params = request.params
        request.max_tokens = self.scheduler.check_fits(
            request.prompt_len, params.max_tokens, request.image_token_count, n=request.n
        )
        request.cache_root += self.runner.rotary.cache_root(request.prompt_len)
        tail = request.prompt_ids[-4:]
        for seq in request.seqs:
            seq.detokenizer = IncrementalDetokenizer(
                self.loaded.tokenizer,
                tail,
                stop_strings=params.stop,
                skip_special_tokens=params.skip_special_tokens,
            )
            if params.seed is not None and not params.greedy:
                seq.generator = make_generator((params.seed + seq.index) % 2**64, self.runner.device)
        self.scheduler.add(request)

    def pause(self, request_id: str, paused: bool) -> None:
        """Stop (or resume) decoding a request whose client is not reading its outputs."""
        request = self.requests.get(request_id)
        if request is not None:
            request.paused = paused

    def abort(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.scheduler.abort(request)
            request.release()

    def fail_all(self, error: Exception) -> None:
        for request in list(self.requests.values()):
            self._fail(request, error)

    # -- the step ----------------------------------------------------------------------------------

    def step(self) -> bool:
        """One step; False if there was nothing it could do (waiting requests that do not fit while
        paused ones hold the memory)."""
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        self._count_admitted(plan.admitted)
        if not plan.chunks and not plan.vision and not plan.preempted:
            return False
        decodes = sum(c.end - c.start == 1 for c in plan.chunks)
        decode_only = not plan.vision and decodes == len(plan.chunks)
        if plan.vision:
            self._encode(plan)
        if plan.chunks:
            self._forward(plan)
            self._count_step_tokens(plan.num_tokens)
        self.cost.observe_step(decodes, decode_only, time.perf_counter() - started)
        touched = {id(c.seq.request): c.seq.request for c in plan.chunks}
        for request in touched.values():
            if request.request_id in self.requests:  # not failed (a failure sent its own output)
                self._emit(request)
        return True

    def _count_admitted(self, admitted: list[Request]) -> None:
        """Images whose features the processor took from the vision cache are multimodal-cache hits
        now; the others are counted when first encoded (_encode), as found or not."""
        for request in admitted:
            for image in request.images:
                if image.complete:
                    self.mm_cache_queries += 1
                    self.mm_cache_hits += 1

    def _count_step_tokens(self, tokens: int) -> None:
        self.iteration_tokens[bisect.bisect_left(ITERATION_TOKEN_BUCKETS, tokens)] += 1
        self.iteration_tokens_sum += tokens

    def _encode(self, plan: StepPlan) -> None:
        started = time.perf_counter()
        try:
            self._encode_counted(plan)
            stages = self.runner.vision.stages
            tiles = sum(
                (t.end - t.start) if t.stages is None else (t.stages[1] - t.stages[0]) / stages
                for t in plan.vision
            )
            self.cost.observe_vision(tiles, time.perf_counter() - started)
            return
        except Exception:  # noqa: BLE001 - retry one image at a time to find the request at fault
            log.warning("batched vision encoding failed; retrying per image", exc_info=True)
        owners = {id(image): request for request in self.scheduler.running for image in request.images}
        for task in plan.vision:
            request = owners.get(id(task.image))
            if request is None or request.finished:
                continue
            try:
                self.runner.vision.encode([task])
            except Exception as exc:  # noqa: BLE001
                self._fail_or_die(request, exc)
        plan.chunks = [c for c in plan.chunks if not c.seq.request.finished]

    def _encode_counted(self, plan: StepPlan) -> None:
        """Encode the step's vision work; the vision cache's lookups in it, one per image not yet
        encoded, are multimodal-cache queries (the per-image retry after a failure is not counted)."""
        cache = self.vision_cache
        lookups, hits = cache.lookups, cache.lookup_hits
        try:
            self.runner.vision.encode(plan.vision)
        finally:
            self.mm_cache_queries += cache.lookups - lookups
            self.mm_cache_hits += cache.lookup_hits - hits

    def _forward(self, plan: StepPlan) -> None:
        self.runner.copy_blocks(plan.copies)
        started = time.perf_counter()
        try:
            output = self.runner.forward(plan.chunks)
        except Exception as exc:  # noqa: BLE001 - isolate the failure to the requests at fault
            if _is_fatal(exc):
                raise FatalEngineError("unrecoverable device error") from exc
            self._forward_each(plan)
            return
        # Converting the prompt log-probabilities is part of what scoring a prompt costs a step.
        scored = self._record_prompt_logprobs(plan.chunks, output)
        pairs = sum(attention_pairs(c.start, c.end) for c in plan.chunks)
        self.cost.observe_lm(plan.num_tokens, pairs, time.perf_counter() - started, scored)
        self._postprocess(plan.chunks, output)

    def _forward_each(self, plan: StepPlan) -> None:
        log.warning("packed forward failed; rerunning the step one request at a time", exc_info=True)
        by_request: dict[int, list[Chunk]] = {}
        for chunk in plan.chunks:
            by_request.setdefault(id(chunk.seq.request), []).append(chunk)
        for chunks in by_request.values():
            request = chunks[0].seq.request
            try:
                output = self.runner.forward(chunks)
            except Exception as exc:  # noqa: BLE001
                self._fail_or_die(request, exc)
                continue
            self._record_prompt_logprobs(chunks, output)
            self._postprocess(chunks, output)

    def _record_prompt_logprobs(self, chunks: list[Chunk], output: ForwardOutput) -> int:
        """Append the chunks' prompt log-probabilities to their requests' columns; return how many
        tokens were scored."""
        vocabulary = self.vocabulary
        scored = 0
        for index, sampled in output.prompt_logprobs.items():
            chunk = chunks[index]
            request = chunk.seq.request
            columns = self._prompt_columns(request)
            columns.truncate(chunk.start + 1)
            for item in sampled:
                self._append_token(columns, item.token_id, item.logprob)
                for token_id, logprob in item.top:
                    columns.top_ids.append(token_id)
                    columns.top_tokens.append(vocabulary.token_text(token_id))
                    columns.top_logprobs.append(logprob)
            scored += len(sampled)
        return scored

    def _prompt_columns(self, request: Request) -> PromptLogprobs:
        """The request's prompt log-probabilities so far: at first, the first token's (none)."""
        if request.prompt_logprobs is None:
            columns = request.prompt_logprobs = PromptLogprobs(top_k=request.params.prompt_logprobs or 0)
            self._append_token(columns, request.prompt_ids[0], 0.0)
        return request.prompt_logprobs

    def _append_token(self, columns: PromptLogprobs, token_id: int, logprob: float) -> None:
        columns.token_ids.append(token_id)
        columns.tokens.append(self.vocabulary.token_text(token_id))
        columns.token_bytes.append(self.vocabulary.token_bytes(token_id))
        columns.logprobs.append(logprob)

    def _postprocess(self, chunks: list[Chunk], output: ForwardOutput) -> None:
        logits = output.logits
        self.scheduler.computed(chunks)
        rows: list[Sequence] = []
        row_logits: list[int] = []
        for index, chunk in enumerate(c for c in chunks if c.samples):
            seq = chunk.seq
            request = seq.request
            if request.n > 1 and seq.index == 0 and not seq.output_ids:
                # The shared prompt is done: every choice samples from its last logits.
                self.scheduler.fork(request)
                choices = [s for s in request.seqs if not s.finished]
            else:
                choices = [seq]
            rows.extend(choices)
            row_logits.extend([index] * len(choices))
        if not rows:
            return
        picked = logits[torch.tensor(row_logits, device=logits.device)]
        tokens, logprobs, failed = self.runner.sample(rows, picked)
        for seq, reason in failed:
            log.warning("request %s: its output grammar failed: %s", seq.request.request_id, reason)
            if seq.request.request_id in self.requests:
                self._fail(seq.request, RequestFailedError("the output constraint could not be continued"))
        self._append(rows, tokens, logprobs)

    # -- postprocess -------------------------------------------------------------------------------

    def _append(self, seqs: list[Sequence], tokens: list[int], logprobs) -> None:
        now = time.monotonic()
        for row, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            if seq.finished:
                continue
            request = seq.request
            seq.output_ids.append(token)
            if request.first_token_time is None:
                request.first_token_time = now
            request.last_token_time = now
            if token in request.params.extra_stop_token_ids:
                self._finish(seq, "stop")
                continue
            seq.pending_ids.append(token)
            seq.pending_text += seq.detokenizer.step(token)
            if logprobs is not None and request.params.logprobs:
                seq.pending_logprobs.append(self._logprob(logprobs[row]))
            grammar = None if seq.matcher is None else GuidedDecoding.advance(seq.matcher, token)
            if grammar == "error":
                log.warning("request %s: grammar refused a sampled token", request.request_id)
                self._fail(request, RequestFailedError("the output constraint could not be continued"))
            elif seq.detokenizer.stopped or grammar == "stop":
                self._finish(seq, "stop")
            elif len(seq.output_ids) >= request.max_tokens:
                self._finish(seq, "length")

    def _logprob(self, sampled) -> TokenLogprob:
        top = tuple(self._token_logprob(tid, lp) for tid, lp in sampled.top)
        return dataclasses.replace(self._token_logprob(sampled.token_id, sampled.logprob), top=top)

    def _token_logprob(self, token_id: int, logprob: float) -> TokenLogprob:
        vocabulary = self.vocabulary
        return TokenLogprob(
            token_id=token_id,
            token=vocabulary.token_text(token_id),
            logprob=logprob,
            token_bytes=vocabulary.token_bytes(token_id),
        )

    def _finish(self, seq: Sequence, reason: str) -> None:
        if reason != "stop" or not seq.detokenizer.stopped:
            seq.pending_text += seq.detokenizer.flush()
        self.scheduler.finish(seq, reason)

    def _emit(self, request: Request) -> None:
        deltas = []
        for seq in request.seqs:
            reason = seq.finish_reason if seq.finished and not seq.finish_reported else None
            if seq.pending_text or seq.pending_ids or reason:
                deltas.append(
                    CompletionDelta(
                        index=seq.index,
                        text=seq.pending_text,
                        token_ids=seq.pending_ids,
                        logprobs=seq.pending_logprobs if request.params.logprobs else None,
                        finish_reason=reason,
                    )
                )
            seq.finish_reported = seq.finish_reported or reason is not None
            seq.pending_text, seq.pending_ids, seq.pending_logprobs = "", [], []
        if not deltas and not request.finished:
            return
        finished = request.finished
        if finished:
            self.requests.pop(request.request_id, None)
            request.release()
        queue_time = None
        if request.first_scheduled_time is not None:
            queue_time = request.first_scheduled_time - request.arrival_time
        output = RequestOutput(
            request_id=request.request_id,
            deltas=deltas,
            prompt_tokens=request.prompt_len,
            completion_tokens=sum(len(s.output_ids) for s in request.seqs),
            image_tokens=request.image_token_count,
            cached_tokens=request.num_cached_tokens,
            finished=finished,
            queue_time=queue_time,
            recomputed_tokens=request.num_recomputed_tokens,
            stats=self._finished_stats(request) if finished else None,
            prompt_logprobs=self._prompt_logprobs(request) if deltas else None,
        )
        if request.sink is not None:
            request.sink(output)

    def _prompt_logprobs(self, request: Request) -> PromptLogprobs | None:
        """The prompt's tokens with their log-probabilities, once, on the first output with a
        token (the whole prompt has been computed by then)."""
        if not request.scores_prompt:
            return None
        request.prompt_logprobs_reported = True
        columns = self._prompt_columns(request)  # a one-token prompt has nothing else to score
        assert len(columns) == request.prompt_len
        request.prompt_logprobs = None  # the output owns them now
        return columns

    @staticmethod
    def _finished_stats(request: Request) -> FinishedRequestStats | None:
        first, last = request.first_token_time, request.last_token_time
        scheduled = request.first_scheduled_time
        if scheduled is None or first is None or last is None:
            return None
        return FinishedRequestStats(
            n=request.n,
            max_tokens=request.max_tokens,
            max_choice_tokens=max(len(s.output_ids) for s in request.seqs),
            prefill_time=first - scheduled,
            decode_time=last - first,
        )

    def _fail(self, request: Request, error: Exception) -> None:
        self.requests.pop(request.request_id, None)
        self.scheduler.abort(request, "error")
        request.release()
        if request.sink is not None:
            request.sink(
                RequestOutput(
                    request_id=request.request_id,
                    deltas=[],
                    prompt_tokens=request.prompt_len,
                    completion_tokens=sum(len(s.output_ids) for s in request.seqs),
                    image_tokens=request.image_token_count,
                    cached_tokens=request.num_cached_tokens,
                    finished=True,
                    error=error,
                    recomputed_tokens=request.num_recomputed_tokens,
                )
            )

    def _fail_or_die(self, request: Request, exc: Exception) -> None:
        if _is_fatal(exc):
            raise FatalEngineError("unrecoverable device error") from exc
        if isinstance(exc, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
            message = "the request needs more device memory than is free; send fewer or smaller images"
        else:
            message = "the request failed while being processed"
        log.error("request %s failed", request.request_id, exc_info=exc)
        self._fail(request, RequestFailedError(message))

    # -- introspection -----------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        sched = self.scheduler
        return EngineStats(
            num_running=sched.num_running,
            num_waiting=sched.num_waiting,
            num_paused=sum(r.paused for r in sched.running),
            cache_usage=self.kv.usage,
            cache_used_blocks=self.kv.pool.num_used,
            cache_total_blocks=self.kv.pool.num_usable,
            block_size=self.kv.block_size,
            prefix_cache_queries=sched.prefix_cache_queries,
            prefix_cache_hits=sched.prefix_cache_hits,
            num_preemptions=sched.num_preemptions,
            vision_cache_bytes=self.vision_cache.bytes,
            vision_cache_hits=self.vision_cache.hits,
            vision_cache_misses=self.vision_cache.misses,
            mm_cache_queries=self.mm_cache_queries,
            mm_cache_hits=self.mm_cache_hits,
            iteration_tokens_buckets=tuple(self.iteration_tokens),
            iteration_tokens_sum=self.iteration_tokens_sum,
            cache_dtype=str(self.loaded.dtype).removeprefix("torch."),
            enable_prefix_caching=self.kv.prefix_caching,
        )
