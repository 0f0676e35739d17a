"""The engine's memory and scheduling goals (issue 11), measured in-process on a random InternVL.

Three measurements, each repeated (--repeats) and reported as median and range:

  memory   16 concurrent short chats (~100-token prompt, 96 output tokens) with a KV cache worth
           2,048 tokens: how many run together at the peak (whole-context slots ran one at a time).
  prefix   a chat with one 13-tile image (~3,400 prompt tokens): time to first token of turn 2
           (the whole conversation re-sent, as every chat frontend does) against turn 1, with prefix
           caching on and off. Each repeat uses an image of its own.
  stall    four streams decoding when six requests with 13-tile images arrive at once: the longest
           gap between two tokens of those streams while the images are prefilled, against their
           median gap before the burst.

    python benchmarks/engine_goals.py                  # all three, small model, CPU, fp32
    python benchmarks/engine_goals.py --goals prefix --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from model_runtime.config import EngineConfig
from model_runtime.engine.worker import Worker
from model_runtime.loading.tiny import write_tiny_checkpoint
from model_runtime.request import ChatInput, ImageInput, Message
from model_runtime.sampling_params import SamplingParams

STORY = (
    "Tell me a long story about a red panda who lives in a bamboo forest and wants to see the sea one day. "
)


def photo(seed: int, size: tuple[int, int] = (1600, 1200)) -> bytes:
    """A 4:3 JPEG: a 4 x 3 grid + thumbnail, 13 tiles, at the default max_dynamic_patch of 12."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(size[1] // 40, size[0] // 40, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(small).resize(size, Image.Resampling.BILINEAR).save(out, format="JPEG", quality=85)
    return out.getvalue()


def summary(values: list[float], unit: str = "") -> str:
    low, high = min(values), max(values)
    return f"median {statistics.median(values):.2f}{unit} (min {low:.2f}, max {high:.2f}, n={len(values)})"


async def stream(
    worker: Worker,
    rid: str,
    chat: ChatInput,
    params: SamplingParams,
    on_token: Callable[[float], None] | None = None,
) -> tuple[float, str, int]:
    """(seconds to first token, text, cached prompt tokens) of one request through the async API."""
    start = time.perf_counter()
    first, text, cached = None, [], 0
    async for out in worker.generate(rid, chat, params):
        if out.error is not None:
            raise out.error
        now = time.perf_counter()
        for delta in out.deltas:
            if delta.token_ids:
                first = first if first is not None else now - start
                if on_token is not None:
                    for _ in delta.token_ids:
                        on_token(now)
            text.append(delta.text)
        cached = out.cached_tokens
    return first or 0.0, "".join(text), cached


# -- memory -------------------------------------------------------------------------------------------


def _memory_run(
    path: str, args: argparse.Namespace, budget: float, repeat: int
) -> tuple[int, float, int, list[int]]:
    """One run: (peak running, seconds, preemptions, prompt lengths)."""
    worker = Worker.start(
        EngineConfig(model=path, device=args.device, dtype=args.dtype, kv_cache_memory_gib=budget)
    )
    engine, peak = worker.engine, [0]
    step = engine.step

    def counted() -> None:
        step()
        peak[0] = max(peak[0], engine.scheduler.num_running)

    engine.step = counted
    params = SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True)
    chats = [
        ChatInput((Message("system", ("Be brief.",)), Message("user", (f"[{repeat}-{i}] " + STORY,))))
        for i in range(16)
    ]
    lengths = [worker.processor.process("len", c, params).prompt_len for c in chats]

    async def run() -> list:
        return await asyncio.gather(*(stream(worker, f"m{i}", c, params) for i, c in enumerate(chats)))

    started = time.perf_counter()
    asyncio.run(run())
    seconds = time.perf_counter() - started
    asyncio.run(worker.shutdown())
    return peak[0], seconds, engine.scheduler.num_preemptions, lengths


def goal_memory(path: str, args: argparse.Namespace) -> None:
    probe = Worker.start(EngineConfig(model=path, device=args.device, dtype=args.dtype))
    pool = probe.engine.pool
    per_token = pool.total_bytes // (pool.num_blocks * pool.block_size)
    asyncio.run(probe.shutdown())
    budget = 2048 * per_token / 2**30
    runs = [_memory_run(path, args, budget, repeat) for repeat in range(args.repeats)]
    lengths = runs[0][3]
    print(f"KV cache worth 2,048 tokens ({budget * 2**30 / 2**20:.1f} MiB, {per_token} bytes per token)")
    print(f"prompts of {min(lengths)}-{max(lengths)} tokens, 96 output tokens each")
    print(f"peak requests running together (16 offered): {summary([r[0] for r in runs])}")
    print(
        f"preemptions per run: {summary([r[2] for r in runs])}; "
        f"seconds per run: {summary([r[1] for r in runs], ' s')}"
    )


# -- prefix reuse --------------------------------------------------------------------------------------


def goal_prefix(path: str, args: argparse.Namespace) -> None:
    params = SamplingParams(max_tokens=16, temperature=0.0)
    for caching in (True, False):
        worker = Worker.start(
            EngineConfig(model=path, device=args.device, dtype=args.dtype, enable_prefix_caching=caching)
        )
        ratios, firsts, seconds, hits = [], [], [], []
        for repeat in range(args.repeats):
            image = ImageInput(photo(1000 + repeat + (0 if caching else 100)))
            turn1 = ChatInput((Message("user", (image, "Describe the image in detail.")),))
            ttft1, answer, _ = asyncio.run(stream(worker, f"t1-{repeat}", turn1, params))
            turn2 = ChatInput(
                (
                    Message("user", (image, "Describe the image in detail.")),
                    Message("assistant", (answer,)),
                    Message("user", ("And what colours dominate?",)),
                )
            )
            ttft2, _, cached = asyncio.run(stream(worker, f"t2-{repeat}", turn2, params))
            ratios.append(ttft1 / ttft2)
            firsts.append(ttft1)
            seconds.append(ttft2)
            hits.append(cached)
        asyncio.run(worker.shutdown())
        label = "on " if caching else "off"
        print(
            f"prefix caching {label}: turn-1 TTFT {summary(firsts, ' s')}; "
            f"turn-2 TTFT {summary(seconds, ' s')}"
        )
        print(f"   turn-2 faster by {summary(ratios, 'x')}; cached prompt tokens in turn 2: {summary(hits)}")


# -- stalls ---------------------------------------------------------------------------------------------


async def _stall_run(worker: Worker, repeat: int) -> tuple[float, float]:
    """One burst: (quiet median gap, longest gap while the images prefill) of four streams."""
    times: list[list[float]] = [[] for _ in range(4)]
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    streams = [
        asyncio.create_task(
            stream(
                worker,
                f"s{repeat}-{i}",
                ChatInput((Message("user", (f"{i} " + STORY,)),)),
                long,
                times[i].append,
            )
        )
        for i in range(4)
    ]
    # The client's own work is done before the measured window: encoding six JPEGs on this event
    # loop took 0.1-0.2 s, during which it delivered no tokens (it made the worst "gap" of the run).
    short = SamplingParams(max_tokens=1, temperature=0.0)
    chats = [
        ChatInput((Message("user", (ImageInput(photo(500 + 10 * repeat + i)), "What is this?")),))
        for i in range(6)
    ]
    while min(len(t) for t in times) < 20:  # the quiet phase
        await asyncio.sleep(0.01)
    start = time.perf_counter()
    await asyncio.gather(*(stream(worker, f"b{repeat}-{i}", chat, short) for i, chat in enumerate(chats)))
    end = time.perf_counter()
    for task in streams:
        task.cancel()
    await asyncio.gather(*streams, return_exceptions=True)
    pairs = [(a, b) for t in times for a, b in zip(t, t[1:], strict=False)]
    quiet = statistics.median(b - a for a, b in pairs if b <= start)
    return quiet, max(b - a for a, b in pairs if b > start and a < end)


def goal_stall(path: str, args: argparse.Namespace) -> None:
    worker = Worker.start(EngineConfig(model=path, device=args.device, dtype=args.dtype))
    runs = [asyncio.run(_stall_run(worker, repeat)) for repeat in range(args.repeats)]
    asyncio.run(worker.shutdown())
    print(f"quiet median gap of 4 streams: {summary([q for q, _ in runs], ' s')}")
    print(f"longest gap while 6 images of 13 tiles prefill: {summary([w for _, w in runs], ' s')}")
    print(f"longest / quiet median: {summary([w / q for q, w in runs], 'x')}")


GOALS = {"memory": goal_memory, "prefix": goal_prefix, "stall": goal_stall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="small", help="tiny, small or 1b (model_runtime/loading/tiny.py)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--goals", nargs="+", default=list(GOALS), choices=list(GOALS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_tiny_checkpoint(tmp, layout="original", llm="qwen2", size=args.size, seed=0))
        print(f"# random InternVL '{args.size}', {args.dtype} on {args.device}; torch {torch.__version__}")
        for goal in args.goals:
            print(f"\n## {goal}")
            GOALS[goal](path, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
