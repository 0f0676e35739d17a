"""A lower bound on the time any server needs for serve.py's workload on this machine (a roofline).

For the same requests benchmarks/serve.py sends (same workload, seed and max_tokens), it adds up:

  1. media: every image decoded and tiled by load_image (the exact path, strips on every core),
     measured;
  2. compute: the model's floating-point operations for every request (vision tower and projector
     for each tile, the prompt's prefill, then max_tokens decode steps), counted from the model's
     config, at this machine's measured matrix-multiply peak;
  3. memory: each decode step reads every weight once and every sequence's KV cache; at batch N
     (all requests decoding together, the best case) a step cannot take less than those bytes over
     the measured memory bandwidth, nor less than its operations at the peak.

No server can beat the peak on the prefill nor the bandwidth on the decode, and on a machine whose
cores are all busy the media work cannot hide behind the model's. So floor req/s = requests / sum
is an upper bound for every server; with --versus R (another server's req/s on the same workload,
e.g. from serve.py) it prints the largest throughput ratio over that server any server could reach.

    python benchmarks/floor.py --size small --workload image --requests 16 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _loadgen import WORKLOADS, build_messages  # benchmarks/ is on sys.path when run as a script

from model_runtime.config import EngineConfig
from model_runtime.inputs.processor import Processor
from model_runtime.loading.checkpoint import load_checkpoint
from model_runtime.loading.tiny import write_tiny_checkpoint
from model_runtime.request import ChatInput, ImageInput, Message, VideoInput
from model_runtime.sampling_params import SamplingParams
from server.media import decode_data_uri


@dataclass
class Floor:
    requests: int
    roofline: Roofline
    media_s: float = 0.0
    prefill_flops: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: list[int] = field(default_factory=list)
    tiles: int = 0

    @property
    def prefill_s(self) -> float:
        return self.prefill_flops / self.roofline.peak_flops

    @property
    def total_s(self) -> float:
        return self.media_s + self.prefill_s + self.decode_s

    @property
    def req_per_s(self) -> float:
        return self.requests / self.total_s

    def as_json(self) -> dict[str, float | int]:
        return {
            "requests": self.requests,
            "tiles": self.tiles,
            "mean_prompt_tokens": round(sum(self.prompt_tokens) / len(self.prompt_tokens), 1),
            "peak_gflops": round(self.roofline.peak_flops / 1e9, 1),
            "bandwidth_gb_s": round(self.roofline.bandwidth / 1e9, 1),
            "media_s": round(self.media_s, 3),
            "prefill_s": round(self.prefill_s, 3),
            "decode_s": round(self.decode_s, 3),
            "total_s": round(self.total_s, 3),
            "req_per_s": round(self.req_per_s, 4),
        }


@dataclass(frozen=True)
class Shapes:
    """The sizes that set the model's operation count, from an InternVL config."""

    patches: int  # per tile
    patch_dim: int  # 3 * patch_size**2
    vision_width: int
    vision_ffn: int
    vision_layers: int
    tokens_per_tile: int
    width: int
    ffn: int
    layers: int
    q_dim: int
    kv_dim: int
    vocab: int

    @classmethod
    def of(cls, config, tokens_per_tile: int) -> Shapes:
        vision, text = config.vision_config, config.text_config
        image = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
        patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(
            patches=(image // patch) ** 2,
            patch_dim=3 * patch * patch,
            vision_width=vision.hidden_size,
            vision_ffn=vision.intermediate_size,
            vision_layers=vision.num_hidden_layers,
            tokens_per_tile=tokens_per_tile,
            width=text.hidden_size,
            ffn=text.intermediate_size,
            layers=text.num_hidden_layers,
            q_dim=text.num_attention_heads * head_dim,
            kv_dim=text.num_key_value_heads * head_dim,
            vocab=text.vocab_size,
        )

    def tile_flops(self) -> float:
        """Patch embedding, every vision layer (its attention over the tile's tokens) and the projector."""
        n, d = self.patches + 1, self.vision_width  # + the class token
        layer = 2 * n * (4 * d * d + 2 * d * self.vision_ffn) + 4 * n * n * d
        projector = 2 * self.tokens_per_tile * (4 * d * self.width + self.width * self.width)
        return 2 * self.patches * self.patch_dim * d + self.vision_layers * layer + projector

    def token_linear_flops(self) -> float:
        """One token through every language-model layer's projections and MLP (no attention)."""
        d = self.width
        per_layer = 2 * (d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d + 3 * d * self.ffn)
        return self.layers * per_layer

    def prefill_flops(self, prompt: int) -> float:
        """A prompt's prefill: every token's projections, causal attention, logits for the last token."""
        attention = self.layers * 2 * prompt * prompt * self.q_dim  # half of 4 * P^2 * q_dim
        return prompt * self.token_linear_flops() + attention + 2 * self.width * self.vocab

    def decode_flops(self, context: int) -> float:
        return (
            self.token_linear_flops() + self.layers * 4 * context * self.q_dim + 2 * self.width * self.vocab
        )

    def kv_bytes(self, context: int, element: int) -> float:
        return self.layers * 2 * context * self.kv_dim * element


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step must read: the language model's layers, final norm and
    output head. Not the vision tower or projector, and not the input embedding table, of which a
    step reads one row (unless it is tied to the head, where the head's read counts it once).
    Weights the engine packed for oneDNN (cpu_linear.py) are buffers, not parameters."""
    language_model = model.model.language_model
    embedding = language_model.get_input_embeddings().weight
    packed = [b for module in (language_model, model.lm_head) for b in module.buffers() if b.is_mkldnn]
    head = list(model.lm_head.parameters())
    tensors = {id(t): t for t in (*language_model.parameters(), *head, *packed)}
    if all(t is not embedding for t in head):
        tensors.pop(id(embedding))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def best_seconds(device: torch.device, work: Callable[[], object], runs: int = 5) -> float:
    """The fastest of runs + 1 timed calls of work() (the first warms up), synchronized on a GPU."""
    best = float("inf")
    for _ in range(runs + 1):
        sync(device)
        start = time.perf_counter()
        work()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """The best operations per second of one large square matrix multiply (2048 on a CPU, 8192 on a
    GPU, which a smaller one cannot fill)."""
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / best_seconds(device, lambda: torch.mm(a, b))


def memory_bandwidth(device: torch.device, mib: int = 1024) -> float:
    """The best bytes per second of reading one large buffer (a sum over it)."""
    buffer = torch.ones(mib * 2**20 // 4, device=device, dtype=torch.float32)
    return buffer.numel() * 4 / best_seconds(device, buffer.sum)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Roofline:
    """What this machine allows one model: the measured matmul peak and memory bandwidth, with the
    model's shapes and the bytes of weights every decode step reads."""

    shapes: Shapes
    peak_flops: float  # per second, in the model's dtype
    bandwidth: float  # bytes per second
    weight_bytes: int
    element: int  # bytes per KV-cache value

    @classmethod
    def measure(cls, loaded) -> Roofline:
        model, device = loaded.model, loaded.device
        return cls(
            shapes=Shapes.of(model.config, loaded.tokens_per_tile),
            peak_flops=matmul_peak(device, model.dtype),
            bandwidth=memory_bandwidth(device),
            weight_bytes=decode_weight_bytes(model),
            element=torch.finfo(model.dtype).bits // 8,
        )

    def decode_step_s(self, contexts: Sequence[int]) -> float:
        """The least time one decode step of sequences this long (in tokens so far) can take: no
        faster than its operations at the peak, nor than reading the weights and their KV caches."""
        flops = sum(self.shapes.decode_flops(c) for c in contexts)
        read = self.weight_bytes + sum(self.shapes.kv_bytes(c, self.element) for c in contexts)
        return max(flops / self.peak_flops, read / self.bandwidth)


def measure(processor: Processor, chats: list[ChatInput], max_tokens: int) -> Floor:
    floor = Floor(requests=len(chats), roofline=Roofline.measure(processor.loaded))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    requests = [processor.process(f"floor-{i}", chat, params) for i, chat in enumerate(chats)]
    floor.media_s = time.perf_counter() - start
    floor.prompt_tokens = [r.prompt_len for r in requests]
    floor.tiles = sum(im.num_tiles for r in requests for im in r.images)
    shapes = floor.roofline.shapes
    floor.prefill_flops = floor.tiles * shapes.tile_flops() + sum(
        shapes.prefill_flops(p) for p in floor.prompt_tokens
    )
    floor.decode_s = sum(
        floor.roofline.decode_step_s([p + step for p in floor.prompt_tokens]) for step in range(max_tokens)
    )
    return floor


def chat_input(messages: list[dict]) -> ChatInput:
    """serve.py's OpenAI messages (data: URIs) as the runtime's ChatInput."""
    out = []
    for message in messages:
        parts: list = []
        for part in message["content"]:
            if part["type"] == "text":
                parts.append(part["text"])
            else:
                kind = "image" if part["type"] == "image_url" else "video"
                data = decode_data_uri(part[part["type"]]["url"], kind, max_bytes=2**31)
                parts.append(ImageInput(data) if kind == "image" else VideoInput(data))
        out.append(Message(message["role"], tuple(parts)))
    return ChatInput(tuple(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="small", help="random model shape (model_runtime/tiny.py)")
    parser.add_argument("--llm", default="qwen2")
    parser.add_argument("--model", help="a checkpoint directory instead of a random model")
    parser.add_argument("--workload", default="image", choices=WORKLOADS)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--first-index", type=int, default=0, help="index of the first request (serve.py's)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--versus", type=float, help="another server's req/s on this workload")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(
            write_tiny_checkpoint(
                Path(tmp) / "model", layout="original", llm=args.llm, size=args.size, seed=args.seed
            )
        )
        config = EngineConfig(model=model, device=args.device, dtype=args.dtype, vision_cache_mib=0)
        loaded = load_checkpoint(config)
        processor = Processor(loaded, config)
        # The same requests serve.py sends, warm-up first (a different index, not timed).
        first = args.first_index
        chats = [
            chat_input(build_messages(args.workload, i, args.seed))
            for i in range(first, first + args.requests)
        ]
        measure(processor, [chat_input(build_messages(args.workload, first + args.requests, args.seed))], 2)
        floor = measure(processor, chats, args.max_tokens)

    tokens = floor.prompt_tokens
    print(
        f"# floor: {args.requests} '{args.workload}' requests (seed {args.seed}), "
        f"{args.max_tokens} output tokens, random '{args.size}' model, {args.dtype} on {loaded.device}, "
        f"torch {torch.__version__}"
    )
    mean = sum(tokens) / len(tokens)
    print(f"prompt tokens per request: mean {mean:.0f}, max {max(tokens)}; tiles {floor.tiles}")
    print(
        f"this machine: matmul peak {floor.roofline.peak_flops / 1e9:.0f} GFLOP/s ({args.dtype}), "
        f"memory bandwidth {floor.roofline.bandwidth / 1e9:.1f} GB/s"
    )
    print(f"media: decode + tiles, measured            {floor.media_s:7.2f} s")
    tflop = floor.prefill_flops / 1e12
    print(f"vision + prefill: {tflop:6.2f} TFLOP at the peak  {floor.prefill_s:7.2f} s")
    print(f"decode: {args.max_tokens} steps at batch {args.requests}, roofline   {floor.decode_s:7.2f} s")
    print(
        f"floor                                      {floor.total_s:7.2f} s "
        f"= {floor.req_per_s:.3f} req/s at most"
    )
    result = floor.as_json()
    if args.versus:
        bound = floor.req_per_s / args.versus
        result["versus_req_per_s"] = args.versus
        result["max_ratio"] = round(bound, 2)
        print(f"versus {args.versus:.3f} req/s: no server on this machine can exceed {bound:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
