"""The resident worker: owns the model for the life of the process and runs the step loop.

The loop runs in a background *thread*, not a process: torch releases the GIL inside its kernels,
so the asyncio server stays responsive, and requests (with their pixel tensors) and outputs cross
over without serialisation. Media decoding and prompt building run on separate threads, fair
between requests (inputs/lanes.py), so a large image never stalls the decode loop or another
request. The server talks to `Worker` through `EngineClient`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import io
import itertools
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model_runtime.config import EngineConfig
from model_runtime.cpu_threads import release_openmp_pool, use_one_openmp_thread
from model_runtime.engine.engine import Engine
from model_runtime.engine.sequence import Request
from model_runtime.engine_client import HealthState, ModelInfo
from model_runtime.errors import EngineDeadError, InvalidRequestError, detached, release_frames
from model_runtime.inputs import resize
from model_runtime.inputs.heap import trim_heap
from model_runtime.inputs.lanes import FairExecutor
from model_runtime.inputs.processor import Processor
from model_runtime.loading.checkpoint import LoadedCheckpoint, load_checkpoint
from model_runtime.request import ChatInput, EngineStats, ImageInput, Message, RequestOutput
from model_runtime.sampling_params import SamplingParams

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05
# Outputs a stream may have waiting for its client before its request stops decoding, and the
# backlog at which it resumes. An output is one step's tokens for the request (usually one).
PAUSE_AT_OUTPUTS = 64
RESUME_AT_OUTPUTS = 16


class _Stream:
    """One request's outputs on their way to the client, on the event loop's side."""

    __slots__ = ("request_id", "outputs", "paused", "cut")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.paused = False
        self.cut: Exception | None = None  # abort(request_id, error) ends the stream with this


class Worker:
    """Async face of the engine (implements `EngineClient`)."""

    def __init__(self, loaded: LoadedCheckpoint, config: EngineConfig) -> None:
        self.config = config
        self.engine = Engine(loaded, config)
        self.loaded = loaded = self.engine.loaded  # its max_model_len may be the engine's default
        self.processor = Processor(loaded, config, self.engine.vision_cache, self.engine.vocabulary)
        self.info = ModelInfo(
            max_model_len=loaded.max_model_len,
            max_tiles_per_image=config.max_tiles_ceiling,  # what detail=high asks for
            default_tiles_per_image=loaded.max_tiles,
            default_frames_per_video=config.frames_per_video,
            template=loaded.template.name,
            tool_format=self.processor.tool_format.name,
            cache_block_size=config.block_size if config.enable_prefix_caching else 0,
        )
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # Media jobs (headers, decoding, tiling) are served request by request in turn, and one
        # request never holds more than half the threads: a request with sixteen slow images waits
        # for its own images, not everybody else for them. Prompts are built and tokenized on their
        # own thread, so a text-only request never queues behind anybody's pixels.
        # Their threads run torch on themselves alone (cpu_threads.py: the engine thread's steps slow
        # down by half while other threads keep OpenMP pools).
        self._media = FairExecutor(
            config.preprocess_workers,
            per_lane=max(1, config.preprocess_workers // 2),
            name="internvl-media",
            initializer=resize.media_thread,
        )
        self._prompts = FairExecutor(1, per_lane=1, name="internvl-prompt", initializer=use_one_openmp_thread)
        self._state: HealthState = "starting"
        self._stop = threading.Event()
        self._stats = self.engine.stats()
        # Outputs of the current step, per event loop: delivered with one wake-up per step and loop
        # rather than one per request (each wake-up contends for the GIL with the next step).
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        self._streams: dict[str, _Stream] = {}  # touched on the event loop only
        self._thread = threading.Thread(target=self._loop, name="internvl-engine", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------------

    @classmethod
    def start(cls, config: EngineConfig) -> Worker:
        """Load the checkpoint, start the loop and warm it up (blocking)."""
        worker = cls(load_checkpoint(config), config)
        worker._thread.start()
        worker._warm_up()
        release_openmp_pool()  # loading and the warm-up's pixels ran on this thread (cpu_threads.py)
        # What exists now (the model, the tokenizer, the imports) lives as long as the process: keep
        # it out of the cyclic collector's passes, whose pauses would stall steps.
        gc.freeze()
        return worker

    def _warm_up(self) -> None:
        """Run a text and a one-tile image request before serving: the first real request does not
        pay for lazy initialisation, and the step cost model starts from measured times."""
        resize.matches_pillow()  # the once-per-process check, here rather than in the first request
        noise = np.random.default_rng(0).integers(0, 255, size=(448, 448, 3), dtype=np.uint8)
        image = io.BytesIO()
        Image.fromarray(noise).save(image, format="PNG")
        chats = [
            ChatInput((Message("user", ("warm up",)),)),
            ChatInput((Message("user", (ImageInput(image.getvalue(), max_tiles=1), "warm up")),)),
        ]
        for index, chat in enumerate(chats):
            request = self.processor.process(
                f"warmup-{index}", chat, SamplingParams(max_tokens=2, temperature=0.0)
            )
            done = threading.Event()
            request.sink = lambda out, done=done: done.set() if out.finished else None
            self._submit(request).result()
            if not done.wait(timeout=600) or self._state == "dead":
                raise RuntimeError("the engine did not finish its warm-up requests")
        self.engine.vision_cache.clear()  # the warm-up image is nobody's
        self._state = "ready"

    async def shutdown(self) -> None:
        """Stop the loop, then free the KV cache and the weights: gigabytes the OS would otherwise
        take back during the process's exit (0.1 s per 2 GiB on CPU), while its port refuses
        connections; freed here, they go while the server still answers 503s."""
        self._stop.set()
        self._commands.put(("wake", None, None))
        await asyncio.to_thread(self._thread.join, 30)
        self._media.shutdown()
        self._prompts.shutdown()
        if not self._thread.is_alive():  # a step still running would use them
            await asyncio.to_thread(self._free_memory)

    def _free_memory(self) -> None:
        self.engine.pool.release()
        with torch.no_grad():
            for module in self.loaded.model.modules():  # oneDNN-packed weights (cpu_linear.py) have
                for name, buffer in list(module.named_buffers(recurse=False)):  # no .data to swap
                    if buffer is not None and buffer.is_mkldnn:
                        setattr(module, name, torch.empty(0))
            for tensor in itertools.chain(self.loaded.model.parameters(), self.loaded.model.buffers()):
                tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        trim_heap()

    @property
    def served_model_default_name(self) -> str:
        model = self.config.model
        return Path(model).name if Path(model).exists() else model

    @property
    def health(self) -> HealthState:
        return self._state

    def stats(self) -> EngineStats:
        return self._stats

    # -- the loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        engine = self.engine
        busy = False
        while not self._stop.is_set():
            try:
                # Block for commands when the last step found nothing to do: idle, or waiting
                # requests that cannot fit while paused ones hold the memory.
                self._drain_commands(block=not busy)
                busy = engine.scheduler.has_work and engine.step()
                self._stats = engine.stats()
                self._flush()
            except Exception:  # noqa: BLE001 - anything escaping a step leaves the device state unknown
                log.critical("engine loop failed; marking the worker dead", exc_info=True)
                self._state = "dead"
                engine.fail_all(EngineDeadError("the engine failed and is restarting; retry the request"))
                self._stats = engine.stats()
                self._fail_pending()
                self._flush()
                return

    def _post(self, loop: asyncio.AbstractEventLoop, stream: _Stream, output: RequestOutput) -> None:
        self._outbox.setdefault(loop, []).append((stream, output))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(self._deliver, items)

    def _deliver(self, items: list[tuple[_Stream, RequestOutput]]) -> None:
        """On the event loop: queue each output for its stream; a stream whose client has fallen
        PAUSE_AT_OUTPUTS behind has its request paused (it keeps its memory, stops decoding)."""
        for stream, output in items:
            stream.outputs.put_nowait(output)
            if not stream.paused and not output.finished and stream.outputs.qsize() >= PAUSE_AT_OUTPUTS:
                stream.paused = True
                self._commands.put(("pause", stream.request_id, True))

    def _drain_commands(self, *, block: bool) -> None:
        try:
            item = self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload, future = item
            if kind == "add":
                try:
                    self.engine.add(payload)
                    future.set_result(None)
                except Exception as exc:  # noqa: BLE001 - typed errors go back to the caller
                    future.set_exception(detached(exc))
                payload = future = item = None  # the refused request is the caller's again, not this frame's
            elif kind == "abort":
                self.engine.abort(payload)
            elif kind == "pause":
                self.engine.pause(payload, future)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _fail_pending(self) -> None:
        while True:
            try:
                kind, _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                future.set_exception(EngineDeadError("the engine is not serving; retry later"))

    def _submit(self, request: Request) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._state == "dead":
            future.set_exception(EngineDeadError("the engine is not serving; retry later"))
            return future
        self._commands.put(("add", request, future))
        return future

    # -- the async API -----------------------------------------------------------------------------

    async def _prepare(
        self, request_id: str, chat: ChatInput, params: SamplingParams, cache_salt: str
    ) -> Request:
        """The processor's jobs for one request: plan, each medium's decode, then the prompt."""
        processor = self.processor
        has_media = any(not isinstance(part, str) for message in chat.messages for part in message.parts)
        first = self._media if has_media else self._prompts
        try:
            plan = await asyncio.wrap_future(
                first.submit(request_id, processor.plan, chat, params, cache_salt)
            )
            decoded = await asyncio.gather(
                *(
                    asyncio.wrap_future(self._media.submit(request_id, processor.decode, m))
                    for m in plan.media
                )
            )
            return await asyncio.wrap_future(
                self._prompts.submit(request_id, processor.finish, request_id, plan, decoded)
            )
        except BaseException:
            # A refused or abandoned request: its queued decodes are dropped, not run for nobody.
            self._media.cancel(request_id)
            self._prompts.cancel(request_id)
            raise

    async def generate(
        self, request_id: str, chat: ChatInput, params: SamplingParams, *, cache_salt: str = ""
    ) -> AsyncIterator[RequestOutput]:
        if self._state == "dead":
            raise EngineDeadError("the engine is not serving; retry later")
        params.validate()
        loop = asyncio.get_running_loop()
        stream = self._streams[request_id] = _Stream(request_id)
        finished = False
        try:
            try:
                request = await self._prepare(request_id, chat, params, cache_salt)
                if stream.cut is not None:
                    raise stream.cut
                request.sink = functools.partial(self._post, loop, stream)
                await asyncio.wrap_future(self._submit(request))
            except BaseException as exc:
                # A refusal frees its pixels now, not at the next full collection: the error the
                # client gets keeps this frame (and the finished ones below it) in its traceback.
                request = None
                release_frames(exc)
                raise
            del request  # the engine holds it now; this frame must not keep its pixels while streaming
            while not finished:
                output = await stream.outputs.get()
                finished = output.finished
                if stream.paused and stream.outputs.qsize() <= RESUME_AT_OUTPUTS:
                    stream.paused = False
                    self._commands.put(("pause", request_id, False))
                yield output
        finally:
            del self._streams[request_id]
            if not finished:
                self._commands.put(("abort", request_id, None))

    async def tokenize(self, chat: ChatInput) -> list[int]:
        if self._state == "dead":
            raise EngineDeadError("the engine is not serving; retry later")
        request_id = f"tokenize-{uuid.uuid4().hex}"
        try:
            request = await self._prepare(request_id, chat, SamplingParams(max_tokens=1), "")
        except BaseException as exc:
            release_frames(exc)
            raise
        ids = list(request.prompt_ids)
        request.release()
        return ids

    async def detokenize(self, token_ids: list[int]) -> str:
        known = len(self.loaded.tokenizer)
        bad = next((t for t in token_ids if not 0 <= t < known), None)
        if bad is not None:
            raise InvalidRequestError(
                f"token id {bad} is not in the vocabulary (0 to {known - 1})", param="tokens"
            )
        # On the prompt threads, not the event loop: a context's worth of ids takes milliseconds.
        future = self._prompts.submit(
            f"detokenize-{uuid.uuid4().hex}", self.loaded.tokenizer.decode, token_ids
        )
        return str(await asyncio.wrap_future(future))

    async def abort(self, request_id: str, error: Exception | None = None) -> None:
        """Stop generating for the request; with `error`, its stream ends with a final output
        carrying it (the server cutting requests at its drain deadline)."""
        self._commands.put(("abort", request_id, None))
        stream = self._streams.get(request_id)
        if error is not None and stream is not None and stream.cut is None:
            stream.cut = error
            stream.outputs.put_nowait(RequestOutput(request_id, [], 0, 0, finished=True, error=error))
