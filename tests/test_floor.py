"""benchmarks/floor.py: its operation count matches what the model really runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import floor  # noqa: E402  (benchmarks/ is a directory of scripts)

from model_runtime.request import ChatInput, ImageInput, Message  # noqa: E402
from model_runtime.sampling_params import SamplingParams  # noqa: E402


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_counted_matmuls_equal_the_models(llm, tiny_checkpoints, load_cached) -> None:
    from benchmarks.preprocess import encode, synthetic_image
    from model_runtime.config import EngineConfig
    from model_runtime.inputs.processor import Processor

    loaded = load_cached(tiny_checkpoints[(llm, "original")])
    processor = Processor(loaded, EngineConfig(model=str(loaded.path), vision_cache_mib=0))
    image = encode(synthetic_image(900, 500), "PNG")
    chat = ChatInput((Message("user", (ImageInput(image), "What is this?")),))
    request = processor.process("r", chat, SamplingParams(max_tokens=1))
    tiles, prompt = sum(im.num_tiles for im in request.images), request.prompt_len
    shapes = floor.Shapes.of(loaded.model.config, loaded.tokens_per_tile)

    pixels = torch.cat([im.pixel_values for im in request.images])
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        loaded.model(input_ids=torch.tensor([request.prompt_ids]), pixel_values=pixels, logits_to_keep=1)
    # The counter sees every matmul and convolution but not CPU attention kernels: compare without
    # the attention terms, which are the textbook 4*n^2*d (vision) and causal 2*P^2*d (language).
    vision_attention = shapes.vision_layers * 4 * (shapes.patches + 1) ** 2 * shapes.vision_width
    language_attention = shapes.layers * 2 * prompt * prompt * shapes.q_dim
    counted = tiles * shapes.tile_flops() + shapes.prefill_flops(prompt)
    assert counted - tiles * vision_attention - language_attention == counter.get_total_flops()


def test_floor_script_runs_end_to_end(tmp_path: Path, tiny_checkpoints) -> None:
    out = tmp_path / "floor.json"
    model = str(tiny_checkpoints[("qwen2", "original")])
    args = ["--model", model, "--requests", "2", "--max-tokens", "3", "--versus", "0.5", "--json", str(out)]
    assert floor.main(args) == 0
    result = json.loads(out.read_text())
    assert result["requests"] == 2 and result["tiles"] > 0
    assert result["total_s"] == pytest.approx(
        result["media_s"] + result["prefill_s"] + result["decode_s"], abs=2e-3
    )
    assert result["max_ratio"] == pytest.approx(result["req_per_s"] / 0.5, rel=1e-2)


def test_decode_reads_the_language_model_and_head_but_not_the_embedding_table(
    tiny_checkpoints, load_cached
) -> None:
    model = load_cached(tiny_checkpoints[("qwen2", "original")]).model
    language_model = model.model.language_model
    table = language_model.get_input_embeddings().weight
    assert model.lm_head.weight is not table  # untied in the tiny checkpoints
    size = sum(t.numel() * t.element_size() for t in language_model.parameters())
    size += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    assert floor.decode_weight_bytes(model) == size - table.numel() * table.element_size()
