"""The worker's async API on the tiny model: streaming, aborts on close, errors before output, health."""

from __future__ import annotations

import asyncio

import pytest

from model_runtime.config import EngineConfig
from model_runtime.engine.worker import Worker
from model_runtime.errors import EngineDeadError, InvalidRequestError, MediaError, PromptTooLongError
from model_runtime.request import ChatInput, ImageInput, Message
from model_runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    from model_runtime.loading.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("worker"))
    worker = Worker.start(EngineConfig(model=str(path), max_model_len=2048, max_num_seqs=8))
    yield worker
    asyncio.run(worker.shutdown())


def chat(text: str = "Hello there") -> ChatInput:
    return ChatInput((Message("user", (text,)),))


async def collect(worker: Worker, rid: str, params: SamplingParams, content: ChatInput | None = None):
    outputs = []
    async for output in worker.generate(rid, content or chat(), params):
        outputs.append(output)
    return outputs


def test_ready_after_start(worker: Worker) -> None:
    assert worker.health == "ready"
    assert worker.info.max_model_len == 2048 and worker.info.template == "internvl2_5"


def test_concurrent_streams_complete(worker: Worker) -> None:
    async def main():
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        return await asyncio.gather(*(collect(worker, f"c{i}", params) for i in range(6)))

    results = asyncio.run(main())
    for outputs in results:
        assert outputs[-1].finished and outputs[-1].completion_tokens == 16
        assert sum(len(d.token_ids) for o in outputs for d in o.deltas) == 16
    texts = {"".join(d.text for o in outs for d in o.deltas) for outs in results}
    assert len(texts) == 1  # the same greedy prompt gives the same text in every stream


def test_closing_the_stream_aborts_and_frees(worker: Worker) -> None:
    async def main():
        stream = worker.generate("gone", chat(), SamplingParams(max_tokens=500, ignore_eos=True))
        await stream.__anext__()
        await stream.aclose()  # what the server does when the client disconnects
        for _ in range(100):
            await asyncio.sleep(0.02)
            stats = worker.stats()
            if stats.num_running == 0 and stats.cache_used_blocks == 0:
                return stats
        return worker.stats()

    stats = asyncio.run(main())
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.cache_used_blocks == 0


def test_errors_arrive_before_any_output(worker: Worker) -> None:
    async def first(content, params):
        return await worker.generate("e", content, params).__anext__()

    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(first(chat(), SamplingParams(temperature=5.0)))
    assert info.value.param == "temperature"
    with pytest.raises(PromptTooLongError):
        asyncio.run(first(chat("word " * 3000), SamplingParams(max_tokens=10)))
    with pytest.raises(MediaError):
        asyncio.run(
            first(ChatInput((Message("user", (ImageInput(b"not an image"), "hi")),)), SamplingParams())
        )


def test_dead_engine_refuses(tmp_path) -> None:
    from model_runtime.loading.tiny import write_tiny_checkpoint

    worker = Worker.start(EngineConfig(model=str(write_tiny_checkpoint(tmp_path / "m"))))

    def fatal(request):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    worker.engine.fault_hook = fatal

    async def main():
        outputs = await collect(worker, "x", SamplingParams(max_tokens=4))
        for _ in range(50):
            if worker.health == "dead":
                break
            await asyncio.sleep(0.02)
        return outputs

    outputs = asyncio.run(main())
    assert worker.health == "dead"
    assert isinstance(outputs[-1].error, EngineDeadError)
    with pytest.raises(EngineDeadError):
        asyncio.run(collect(worker, "y", SamplingParams(max_tokens=4)))
    asyncio.run(worker.shutdown())


def _png(width: int, height: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    noise = np.random.default_rng(width).integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()


def _rss_mib() -> float:
    import os

    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _pixel_tensors() -> int:
    import gc

    import torch

    return sum(
        1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.dim() == 4 and o.shape[1] == 3
    )


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_refusals_hold_nothing(worker: Worker) -> None:
    """Requests refused after their images were decoded free the pixels at once, without waiting for
    the cyclic collector (disabled here): RSS stays flat over many refusals."""
    import gc

    big = _png(1344, 896)  # 2x3 tiles + thumbnail: 7 tiles, 17 MB of float32 pixels
    truncated = _png(640, 480)
    truncated = truncated[: len(truncated) // 2]  # the header reads, the pixels do not
    too_long = ChatInput((Message("user", (ImageInput(big, max_tiles=6), "a " * 400)),))  # exact count > 2048
    bad_second = ChatInput(
        (Message("user", (ImageInput(big, max_tiles=4), ImageInput(truncated, max_tiles=1), "hi")),)
    )

    async def refused(rid: str, content: ChatInput, expected: type[Exception]) -> None:
        with pytest.raises(expected) as info:
            async for _ in worker.generate(rid, content, SamplingParams(max_tokens=8)):
                pass
        assert "at least" not in str(info.value)  # refused after decoding, not by the lower bound

    asyncio.run(refused("warm", too_long, PromptTooLongError))
    gc.collect()
    gc.disable()
    try:
        before_tensors, before = _pixel_tensors(), _rss_mib()
        for i in range(12):
            asyncio.run(refused(f"long{i}", too_long, PromptTooLongError))
            asyncio.run(refused(f"bad{i}", bad_second, MediaError))
        grown = _rss_mib() - before
        assert _pixel_tensors() <= before_tensors
    finally:
        gc.enable()
    # Held, 24 refusals would keep at least 24 x 17 MB (408 MB); what remains is the allocator's
    # noise: freed pages kept by the media threads' arenas, 60-160 MiB over repeated runs.
    assert grown < 250, f"RSS grew {grown:.0f} MiB over 24 refused requests"


def test_a_stream_nobody_reads_pauses_and_resumes(worker: Worker) -> None:
    """Outputs a client does not read stop piling up: the request pauses (keeping its memory) once
    PAUSE_AT_OUTPUTS are waiting, other streams go on, and it resumes when read."""
    from model_runtime.engine.worker import PAUSE_AT_OUTPUTS

    async def main():
        params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        slow = worker.generate("slow", chat(), params)
        await slow.__anext__()
        others = await collect(
            worker, "other", SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
        )
        await asyncio.sleep(0.3)
        request = worker.engine.requests["slow"]
        generated = len(request.seqs[0].output_ids)
        paused = request.paused
        rest = [output async for output in slow]
        return others, generated, paused, rest

    others, generated, paused, rest = asyncio.run(main())
    assert others[-1].completion_tokens == 120  # not held up by the paused stream
    assert paused and generated <= PAUSE_AT_OUTPUTS + 2  # the step in flight when it paused
    assert rest[-1].finished and rest[-1].completion_tokens == 400
