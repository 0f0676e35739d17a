"""Offline throughput: the continuous-batching worker vs the model card's one-request-at-a-time loop.

Both run the same random InternVL in the same process and run. The baseline is what `model.chat()`
does: transformers' `generate()` for one request at a time. The worker gets `concurrency` requests
in flight through its async API. Greedy outputs are compared token for token.

Every run measures the baseline and then each concurrency level, and runs are repeated
(--repeats): the table gives the median and the range of the ratios measured within each run.
The engine runs its default settings (only the vision cache is off: the images are distinct).

    python benchmarks/throughput.py                       # CPU, "small" model, fp32
    python benchmarks/throughput.py --size 1b --device cuda --dtype bfloat16 --concurrency 1 16 64
"""

from __future__ import annotations

import argparse
import asyncio
import io
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from floor import Roofline, sync  # benchmarks/ is on sys.path when run as a script
from PIL import Image

from model_runtime.config import EngineConfig
from model_runtime.cpu_threads import release_openmp_pool
from model_runtime.engine.worker import Worker
from model_runtime.loading.checkpoint import load_checkpoint
from model_runtime.loading.tiny import write_tiny_checkpoint
from model_runtime.request import ChatInput, ImageInput, Message
from model_runtime.sampling_params import SamplingParams

QUESTIONS = [
    "Please describe the scene in detail, including the colors, the objects and what the people are doing.",
    "Tell me a long story about a red panda who lives in a bamboo forest and wants to see the sea one day.",
    "Write a poem about the quick brown fox that jumps over the lazy dog, in the style of a sonnet please.",
    "Explain step by step how a vision language model turns the pixels of an image into words and answers.",
]


@dataclass
class Workload:
    name: str
    max_tokens: int
    with_image: bool


WORKLOADS = {"decode": Workload("decode-heavy", 128, False), "image": Workload("image", 64, True)}


def _image_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(448, 448, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def make_chats(workload: Workload, count: int) -> list[ChatInput]:
    chats = []
    for i in range(count):
        parts: tuple = (QUESTIONS[i % len(QUESTIONS)],)
        if workload.with_image:
            # One tile per image (max_tiles=1), distinct images so the feature cache never hits.
            parts = (ImageInput(_image_bytes(i), max_tiles=1), *parts)
        chats.append(ChatInput((Message("user", parts),)))
    return chats


def params_for(workload: Workload) -> SamplingParams:
    return SamplingParams(max_tokens=workload.max_tokens, temperature=0.0, ignore_eos=True)


def run_baseline(
    worker: Worker, model: torch.nn.Module, chats: list[ChatInput], workload: Workload
) -> tuple[float, list[list[int]]]:
    """transformers generate(), one request at a time (the seeds' model.chat() loop), on `model`:
    a stock copy of the checkpoint (the worker's own has its CPU linears packed, cpu_linear.py)."""
    model.generation_config.eos_token_id = None
    device = worker.loaded.device
    outputs, tokens, start = [], 0, time.perf_counter()
    for i, chat in enumerate(chats):
        request = worker.processor.process(f"base-{i}", chat, params_for(workload))
        ids = torch.tensor([request.prompt_ids], device=device)
        kwargs = {}
        if request.images:
            kwargs["pixel_values"] = torch.cat([im.pixel_values for im in request.images]).to(
                device, model.dtype
            )
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=workload.max_tokens,
                do_sample=False,
                pad_token_id=0,
                **kwargs,
            )
        new = out[0, ids.shape[1] :].tolist()
        outputs.append(new)
        tokens += len(new)
    sync(device)
    return tokens / (time.perf_counter() - start), outputs


async def _one(worker: Worker, rid: str, chat: ChatInput, params: SamplingParams) -> list[int]:
    ids: list[int] = []
    async for out in worker.generate(rid, chat, params):
        for delta in out.deltas:
            ids.extend(delta.token_ids)
        if out.error is not None:
            raise out.error
    return ids


async def run_worker(
    worker: Worker, chats: list[ChatInput], workload: Workload, concurrency: int
) -> tuple[float, list[list[int]]]:
    # This thread ran torch work of its own (the baseline, loading): it gives up its OpenMP pool,
    # as the worker's own threads do (model_runtime/cpu_threads.py).
    release_openmp_pool()
    gate = asyncio.Semaphore(concurrency)

    async def limited(i: int, chat: ChatInput) -> list[int]:
        async with gate:
            return await _one(worker, f"w{concurrency}-{i}", chat, params_for(workload))

    start = time.perf_counter()
    outputs = await asyncio.gather(*(limited(i, c) for i, c in enumerate(chats)))
    sync(worker.loaded.device)
    elapsed = time.perf_counter() - start
    return sum(len(o) for o in outputs) / elapsed, outputs


def prefill_efficiency(
    worker: Worker, model: torch.nn.Module, chats: list[ChatInput], workload: Workload
) -> tuple[float, float]:
    """Seconds for the engine's prefill of these requests (batched vision, then packed forwards of
    at most max_num_batched_tokens), and for one plain batched forward of the same tokens
    (transformers, padded batch, as the model card's batch_chat runs it).

    Run while the worker is idle: it takes blocks from the pool from this thread and frees them.
    """
    from model_runtime.engine.scheduler import Chunk, VisionTask

    engine = worker.engine
    device = worker.loaded.device
    requests = [worker.processor.process(f"pf-{i}", c, params_for(workload)) for i, c in enumerate(chats)]
    pixels = torch.cat([im.pixel_values for r in requests for im in r.images]).to(device, model.dtype)
    seqs = [r.seqs[0] for r in requests]
    for seq in seqs:
        assert engine.kv.allocate(seq, seq.num_tokens)
    budget = engine.scheduler.max_num_batched_tokens
    with torch.inference_mode():
        sync(device)
        start = time.perf_counter()
        engine.runner.vision.encode([VisionTask(im, 0, im.num_tiles) for r in requests for im in r.images])
        batch: list[Chunk] = []
        for seq in seqs:
            if batch and sum(c.end for c in batch) + seq.num_tokens > budget:
                engine.runner.forward(batch)
                batch = []
            batch.append(Chunk(seq, 0, seq.num_tokens))
        engine.runner.forward(batch)
        sync(device)
        ours = time.perf_counter() - start
        for seq in seqs:
            engine.kv.free(seq)
        width = max(r.prompt_len for r in requests)
        ids = torch.zeros(len(requests), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, request in enumerate(requests):  # left padding, as batch_chat() does
            ids[row, width - request.prompt_len :] = torch.tensor(request.prompt_ids)
            mask[row, width - request.prompt_len :] = 1
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, logits_to_keep=1)
        sync(device)
        plain = time.perf_counter() - start
    return ours, plain


def roofline_tokens_per_s(worker: Worker, chats: list[ChatInput], workload: Workload) -> float:
    """The most output tokens/s one request at a time could reach: each decode step reads every
    language-model weight and the request's KV cache once at the measured memory bandwidth (and
    does its operations at the measured matmul peak, if that is slower). benchmarks/floor.py."""
    roofline = Roofline.measure(worker.loaded)
    seconds, tokens = 0.0, 0
    for i, chat in enumerate(chats):
        prompt = worker.processor.process(f"roof-{i}", chat, params_for(workload)).prompt_len
        seconds += sum(roofline.decode_step_s([prompt + step]) for step in range(workload.max_tokens))
        tokens += workload.max_tokens
    return tokens / seconds


def start_worker(path: str | Path, device: str, dtype: str, concurrency: int) -> Worker:
    """A worker at the engine's default settings, but for the vision cache (the benchmarks' images
    are distinct anyway), with max_num_seqs raised only if `concurrency` asks for more."""
    defaults = EngineConfig(model=str(path))
    config = EngineConfig(
        model=str(path),
        device=device,
        dtype=dtype,
        max_num_seqs=max(defaults.max_num_seqs, concurrency),
        vision_cache_mib=0,
    )
    return Worker.start(config)


def spread(values: list[float], unit: str = "") -> str:
    """Median and range of repeated measurements."""
    return f"{statistics.median(values):.2f}{unit} ({min(values):.2f}-{max(values):.2f})"


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="small", help="tiny, small or 1b (see model_runtime/tiny.py)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--workloads", nargs="+", default=["decode", "image"], choices=sorted(WORKLOADS))
    parser.add_argument("--baseline-requests", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="requests per run = rounds x concurrency")
    parser.add_argument("--repeats", type=int, default=3, help="runs, each with its own baseline")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(tmp, layout="original", llm="qwen2", size=args.size, seed=0)
        worker = start_worker(path, args.device, args.dtype, max(args.concurrency))
        stock = load_checkpoint(worker.config).model  # what model.chat() runs: transformers as shipped
        device = worker.loaded.device
        print(f"# model: random InternVL '{args.size}', {args.dtype} on {device}; torch {torch.__version__}")
        pool = worker.engine.pool
        per_token = pool.total_bytes // (pool.num_blocks * pool.block_size)
        print(
            f"# default settings; KV cache: {pool.num_blocks - 1} blocks x {pool.block_size} tokens "
            f"({pool.total_bytes / 2**20:.0f} MiB, {per_token} bytes per token), "
            f"max_model_len {worker.loaded.max_model_len}"
        )
        ok = True
        for key in args.workloads:
            workload = WORKLOADS[key]
            base_chats = make_chats(workload, args.baseline_requests)
            print(
                f"\n## {workload.name}: {workload.max_tokens} output tokens per request, {args.repeats} runs"
            )
            bases: list[float] = []
            rows: dict[int, list[tuple[float, float]]] = {c: [] for c in args.concurrency}
            for _ in range(args.repeats):  # the baseline, then every level, in each run
                base_tps, base_out = run_baseline(worker, stock, base_chats, workload)
                bases.append(base_tps)
                for concurrency in args.concurrency:
                    count = max(args.rounds * concurrency, args.baseline_requests)
                    tps, outs = asyncio.run(
                        run_worker(worker, make_chats(workload, count), workload, concurrency)
                    )
                    ok &= all(outs[i] == base_out[i] for i in range(args.baseline_requests))
                    rows[concurrency].append((tps, tps / base_tps))
            print(f"baseline (generate, one at a time): {spread(bases)} output tok/s")
            print(f"greedy outputs identical to the baseline's: {'yes' if ok else 'NO'}")
            print("| concurrency | worker tok/s | vs baseline (same run) |")
            print("|---:|---:|---:|")
            for concurrency, values in rows.items():
                tps, ratios = spread([v[0] for v in values]), spread([v[1] for v in values], "x")
                print(f"| {concurrency} | {tps} | {ratios} |")
            single = statistics.median(v[0] for v in rows[1]) if 1 in rows else None
            if single is not None and not workload.with_image:
                roof = roofline_tokens_per_s(worker, make_chats(workload, args.baseline_requests), workload)
                print(
                    f"concurrency 1 against the memory-bandwidth roofline: at most {roof:.1f} tok/s, "
                    f"measured {single:.1f} ({single / roof:.0%} of the roofline)"
                )
            if workload.with_image:
                count = max(args.concurrency)
                ours, plain = prefill_efficiency(worker, stock, make_chats(workload, count), workload)
                print(
                    f"prefill of {count} image requests: engine {ours:.2f} s vs one plain batched forward "
                    f"{plain:.2f} s ({plain / ours:.0%} of the plain forward's speed)"
                )
        kind = "GPU allocated" if device.type == "cuda" else "RSS"
        print(f"\npeak memory: {peak_memory_mib(device):.0f} MiB ({kind})")
        stats = worker.stats()
        print(
            f"after the run: running={stats.num_running} waiting={stats.num_waiting} "
            f"KV blocks in use={stats.cache_used_blocks}"
        )
        asyncio.run(worker.shutdown())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
