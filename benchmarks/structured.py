"""Structured output's cost: decode throughput of JSON-schema-constrained requests vs free ones.

Both run on the same worker in the same process, alternating within each repeat, at the same
concurrency (default 32) on a decode-heavy workload (128 output tokens per request, no images,
greedy). The constrained requests follow a schema that cannot end before max_tokens (an array of
at least 64 short strings), so both kinds produce the same number of tokens; the ratio of their
output tokens/s is the goal's figure (issue 12: at least 0.9). Also printed: the cost of building
the vocabulary for llguidance (once per model) and of compiling a schema (once per schema; cached).

    python benchmarks/structured.py                    # CPU, "small" model, fp32, c=32, 3 repeats
    python benchmarks/structured.py --size 1b --device cuda --dtype bfloat16 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time

import torch
from throughput import QUESTIONS, spread, start_worker  # benchmarks/ is on sys.path when run as a script

from model_runtime.engine.worker import Worker
from model_runtime.loading.tiny import write_tiny_checkpoint
from model_runtime.request import ChatInput, Message, OutputFormat
from model_runtime.sampling_params import SamplingParams

PREFIX = '{"notes": ["'  # json.dumps style, as the grammar writes it (structured/grammar.py)
SCHEMA = {
    "type": "object",
    "properties": {
        "notes": {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 64},
    },
    "required": ["notes"],
    "additionalProperties": False,
}


def make_chats(count: int, constrained: bool) -> list[ChatInput]:
    fmt = OutputFormat("json_schema", SCHEMA, strict=True) if constrained else None
    return [
        ChatInput((Message("user", (QUESTIONS[i % len(QUESTIONS)],)),), output_format=fmt)
        for i in range(count)
    ]


async def run(
    worker: Worker, chats: list[ChatInput], concurrency: int, max_tokens: int, tag: str
) -> tuple[float, list[str]]:
    gate = asyncio.Semaphore(concurrency)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int, chat: ChatInput) -> tuple[int, str]:
        async with gate:
            tokens, text, reason = 0, [], None
            async for out in worker.generate(f"{tag}-{i}", chat, params):
                if out.error is not None:
                    raise out.error
                for delta in out.deltas:
                    tokens += len(delta.token_ids)
                    text.append(delta.text)
                    reason = delta.finish_reason or reason
            return tokens, "".join(text)

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i, c) for i, c in enumerate(chats)))
    elapsed = time.perf_counter() - start
    return sum(t for t, _ in results) / elapsed, [text for _, text in results]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="small", help="tiny, small or 1b (model_runtime/loading/tiny.py)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="requests per run = rounds x concurrency")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(tmp, layout="original", llm="qwen2", size=args.size, seed=0)
        worker = start_worker(path, args.device, args.dtype, args.concurrency)
        try:
            processor = worker.processor
            start = time.perf_counter()
            processor.vocabulary.warm()
            vocab_s = time.perf_counter() - start
            compiler = processor.structured.compiler
            start = time.perf_counter()
            compiler.json_schema(SCHEMA, strict=True, param="schema")
            compile_s = time.perf_counter() - start
            start = time.perf_counter()
            compiler.json_schema(SCHEMA, strict=True, param="schema")
            cached_s = time.perf_counter() - start
            count = args.rounds * args.concurrency
            print(
                f"# model: random InternVL '{args.size}', {args.dtype} on {worker.loaded.device}; "
                f"vocabulary {processor.vocab_size} tokens; torch {torch.__version__}"
            )
            print(
                f"# {count} requests per run at concurrency {args.concurrency}, {args.max_tokens} output "
                f"tokens each (greedy, ignore_eos), {args.repeats} repeats; free then constrained in each"
            )
            print(f"vocabulary for llguidance, built once per model: {vocab_s * 1000:.0f} ms")
            print(f"schema compile: {compile_s * 1000:.1f} ms cold, {cached_s * 1000:.3f} ms cached")
            asyncio.run(run(worker, make_chats(args.concurrency, True), args.concurrency, 8, "warm"))
            free, constrained, ratios = [], [], []
            valid = True
            for r in range(args.repeats):
                f, _ = asyncio.run(
                    run(worker, make_chats(count, False), args.concurrency, args.max_tokens, f"f{r}")
                )
                c, texts = asyncio.run(
                    run(worker, make_chats(count, True), args.concurrency, args.max_tokens, f"c{r}")
                )
                valid &= all(t.startswith(PREFIX) for t in texts)
                if not valid:
                    print("not following:", [t[:40] for t in texts if not t.startswith(PREFIX)][:3])
                free.append(f)
                constrained.append(c)
                ratios.append(c / f)
            print("| requests | output tok/s |")
            print("|---|---:|")
            print(f"| free | {spread(free)} |")
            print(f"| json_schema | {spread(constrained)} |")
            print(
                f"constrained / free (same run): {spread(ratios, 'x')}; goal >= 0.90x: "
                f"{'met' if statistics.median(ratios) >= 0.9 else 'NOT met'}"
            )
            print(f"every constrained answer follows the schema's prefix: {'yes' if valid else 'NO'}")
        finally:
            asyncio.run(worker.shutdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
