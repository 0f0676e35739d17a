"""The engine: step() = schedule -> run -> postprocess, on the thread that owns the model.

Failures are contained where they can be attributed: a request whose media encoding or prefill
raises fails alone; a failed batched decode fails the sequences in that batch; a device error that
leaves the device unusable (anything but out-of-memory on CUDA) marks the engine dead.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch

from model_runtime.config import EngineConfig
from model_runtime.engine.detokenizer import IncrementalDetokenizer
from model_runtime.engine.kv_cache import CacheShape, SlotKVCache, default_capacity, slots_for_budget
from model_runtime.engine.runner import ModelRunner
from model_runtime.engine.sampler import make_generator
from model_runtime.engine.scheduler import PrefillChunk, Scheduler, SlotMove
from model_runtime.engine.sequence import Request, Sequence
from model_runtime.engine.vision_cache import VisionFeatureCache
from model_runtime.errors import RequestFailedError
from model_runtime.loading.checkpoint import LoadedCheckpoint
from model_runtime.request import CompletionDelta, EngineStats, RequestOutput, TokenLogprob

log = logging.getLogger(__name__)

CPU_DEFAULT_CACHE_GIB = 2.0
GPU_CACHE_FRACTION = 0.85  # of the memory left free after the model is loaded
FEW_SLOTS = 8  # fewer concurrent sequences than this (and than max_num_seqs) is worth a warning
# When the user sets no max_model_len: room for this many sequences (or max_num_seqs if fewer), by
# a shorter context than the model's if need be, but never shorter than DEFAULT_MIN_MODEL_LEN.
DEFAULT_MIN_SLOTS = 16
DEFAULT_MIN_MODEL_LEN = 8192
# Tiles per vision-tower forward. On a CPU one tile at a time is fastest: its activations stay in
# cache (the small benchmark model: 79 ms a tile alone, 89-93 ms in batches of 2-16).
VISION_BATCH_TILES_CPU = 1
VISION_BATCH_TILES_GPU = 64


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


def serving_length(config: EngineConfig, shape: CacheShape, dtype: torch.dtype, budget: int) -> int:
    """The max_model_len to serve: the user's, or kv_cache.default_capacity's choice (logged)."""
    if config.max_model_len is not None:
        return shape.capacity
    want = min(config.max_num_seqs, DEFAULT_MIN_SLOTS)
    capacity = default_capacity(shape, dtype, budget, want_slots=want, min_len=DEFAULT_MIN_MODEL_LEN)
    if capacity < shape.capacity:
        log.info(
            "max_model_len %d (the model allows %d, but the KV cache would then hold only %d "
            "sequences); set --max-model-len to choose",
            capacity,
            shape.capacity,
            slots_for_budget(shape, dtype, budget, config.max_num_seqs),
        )
    return capacity


class Engine:
    """Synchronous engine; the worker calls add/abort/step from its own thread."""

    def __init__(self, loaded: LoadedCheckpoint, config: EngineConfig) -> None:
        self.config = config
        text = loaded.model.config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        shape = CacheShape(text.num_hidden_layers, text.num_key_value_heads, head_dim, loaded.max_model_len)
        budget = cache_budget_bytes(config, loaded.device)
        capacity = serving_length(config, shape, loaded.dtype, budget)
        if capacity != shape.capacity:
            shape = dataclasses.replace(shape, capacity=capacity)
            loaded = dataclasses.replace(loaded, max_model_len=capacity)
        self.loaded = loaded  # with the max_model_len this engine serves
        num_slots = slots_for_budget(shape, loaded.dtype, budget, config.max_num_seqs)
        layers = loaded.model.model.language_model.layers
        devices = [next(layer.parameters()).device for layer in layers]
        self.cache = SlotKVCache(shape, num_slots, loaded.dtype, devices)
        self.vision_cache = VisionFeatureCache(config.vision_cache_mib * 2**20)
        vision_batch = VISION_BATCH_TILES_GPU if loaded.device.type == "cuda" else VISION_BATCH_TILES_CPU
        self.runner = ModelRunner(loaded, self.cache, self.vision_cache, max_vision_batch_tiles=vision_batch)
        self.scheduler = Scheduler(
            num_slots=num_slots,
            max_num_batched_tokens=max(config.max_num_batched_tokens, num_slots),
            max_model_len=loaded.max_model_len,
            max_waiting=config.max_waiting,
        )
        self.requests: dict[str, Request] = {}
        # Unseeded sampling draws from torch's default generator; seeding it makes a server run repeatable.
        torch.manual_seed(config.seed)
        self.fault_hook: Callable[[Request], None] | None = None  # tests inject failures here
        log.info(
            "KV cache: %d slots x %d tokens (%.1f MiB)",
            num_slots,
            shape.capacity,
            self.cache.total_bytes / 2**20,
        )
        if num_slots < min(config.max_num_seqs, FEW_SLOTS):
            # Each slot holds a whole max_model_len context, so a long context leaves few of them.
            log.warning(
                "the KV cache holds only %d sequences of %d tokens: at most %d requests run at once. "
                "Lower --max-model-len (the longest prompt + answer you serve) or raise "
                "--kv-cache-memory-gib to run more together.",
                num_slots,
                shape.capacity,
                num_slots,
            )

    # -- requests ----------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Admit a prepared request to the waiting queue (raises PromptTooLongError / QueueFullError)."""
        params = request.params
        request.max_tokens = self.scheduler.check_fits(
            request.prompt_len, params.max_tokens, request.image_token_count
        )
        tail = request.prompt_ids[-4:]
        for seq in request.seqs:
            seq.detokenizer = IncrementalDetokenizer(self.loaded.tokenizer, tail, stop_strings=params.stop)
            if params.seed is not None and not params.greedy:
                seq.generator = make_generator((params.seed + seq.index) % 2**64, self.runner.device)
        self.scheduler.add(request)
        self.requests[request.request_id] = request

    def abort(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None:
            self._apply(self.scheduler.abort(request))

    def fail_all(self, error: Exception) -> None:
        for request in list(self.requests.values()):
            self._fail(request, error)

    # -- the step ----------------------------------------------------------------------------------

    def step(self) -> None:
        plan = self.scheduler.schedule()
        touched: dict[int, Request] = {}
        if plan.prefills:
            self._run_prefills(plan.prefills, touched)
        if plan.decodes:
            self._run_decode(plan.decodes, touched)
        for request in touched.values():
            self._emit(request)

    def _run_prefills(self, chunks: list[PrefillChunk], touched: dict[int, Request]) -> None:
        starting = [c.request for c in chunks if c.start == 0 and c.request.images]
        self._encode_images(starting)
        for chunk in chunks:
            request = chunk.request
            if request.finished:
                continue
            try:
                if self.fault_hook is not None:
                    self.fault_hook(request)
                logits = self.runner.prefill(chunk)
            except Exception as exc:  # noqa: BLE001 - isolate the failure to this request
                self._fail_or_die(request, exc)
                continue
            self.scheduler.prefilled(chunk)
            if logits is not None:
                seqs = list(request.seqs)
                tokens, logprobs = self.runner.sample(seqs, logits.expand(len(seqs), -1))
                self._append(seqs, tokens, logprobs, touched)

    def _encode_images(self, requests: list[Request]) -> None:
        if not requests:
            return
        try:
            self.runner.encode_images(requests)
            return
        except Exception:  # noqa: BLE001 - retry one by one to find the request at fault
            log.warning("batched vision encoding failed; retrying per request", exc_info=True)
        for request in requests:
            try:
                self.runner.encode_images([request])
            except Exception as exc:  # noqa: BLE001
                self._fail_or_die(request, exc)

    def _run_decode(self, seqs: list[Sequence], touched: dict[int, Request]) -> None:
        try:
            logits = self.runner.decode(seqs)
            tokens, logprobs = self.runner.sample(seqs, logits)
        except Exception as exc:  # noqa: BLE001
            for request in {id(s.request): s.request for s in seqs}.values():
                self._fail_or_die(request, exc)
            return
        self._append(seqs, tokens, logprobs, touched)

    # -- postprocess -------------------------------------------------------------------------------

    def _append(self, seqs: list[Sequence], tokens: list[int], logprobs, touched: dict[int, Request]) -> None:
        for row, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            if seq.finished:
                continue
            request = seq.request
            touched[id(request)] = request
            seq.output_ids.append(token)
            if token in request.params.extra_stop_token_ids:
                self._finish(seq, "stop")
                continue
            seq.pending_ids.append(token)
            seq.pending_text += seq.detokenizer.step(token)
            if logprobs is not None and request.params.logprobs:
                seq.pending_logprobs.append(self._logprob(logprobs[row]))
            if seq.detokenizer.stopped:
                self._finish(seq, "stop")
            elif len(seq.output_ids) >= request.max_tokens:
                self._finish(seq, "length")

    def _logprob(self, sampled) -> TokenLogprob:
        decode = self.loaded.tokenizer.decode
        return TokenLogprob(
            token_id=sampled.token_id,
            token=decode([sampled.token_id]),
            logprob=sampled.logprob,
            top=tuple((tid, decode([tid]), lp) for tid, lp in sampled.top),
        )

    def _finish(self, seq: Sequence, reason: str) -> None:
        if reason != "stop" or not seq.detokenizer.stopped:
            seq.pending_text += seq.detokenizer.flush()
        self._apply(self.scheduler.finish(seq, reason))

    def _apply(self, moves: list[SlotMove]) -> None:
        for src, dst, tokens in moves:
            self.runner.copy_slot(src, dst, tokens)

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
        finished = request.finished
        if finished:
            self.requests.pop(request.request_id, None)
        queue_time = None
        if request.first_scheduled_time is not None:
            queue_time = request.first_scheduled_time - request.arrival_time
        output = RequestOutput(
            request_id=request.request_id,
            deltas=deltas,
            prompt_tokens=request.prompt_len,
            completion_tokens=sum(len(s.output_ids) for s in request.seqs),
            image_tokens=request.image_token_count,
            finished=finished,
            queue_time=queue_time,
        )
        if request.sink is not None:
            request.sink(output)

    def _fail(self, request: Request, error: Exception) -> None:
        self.requests.pop(request.request_id, None)
        self._apply(self.scheduler.abort(request, "error"))
        if request.sink is not None:
            request.sink(
                RequestOutput(
                    request_id=request.request_id,
                    deltas=[],
                    prompt_tokens=request.prompt_len,
                    completion_tokens=sum(len(s.output_ids) for s in request.seqs),
                    image_tokens=request.image_token_count,
                    finished=True,
                    error=error,
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
        used_tokens = sched.used_tokens()
        return EngineStats(
            num_running=sched.num_running,
            num_waiting=sched.num_waiting,
            cache_usage=sched.used_slots / self.cache.num_slots,
            cache_used_tokens=used_tokens,
            cache_total_tokens=self.cache.num_slots * self.cache.shape.capacity,
            vision_cache_bytes=self.vision_cache.bytes,
            vision_cache_hits=self.vision_cache.hits,
            vision_cache_misses=self.vision_cache.misses,
            extra={"num_slots": float(self.cache.num_slots), "used_slots": float(sched.used_slots)},
        )
