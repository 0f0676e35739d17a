"""Deterministic random-weight InternVL checkpoints, in either layout, for tests, demos and benchmarks.

No weights can be downloaded in CI, so the real loading code is exercised on checkpoints we write
ourselves: the same tensors saved in OpenGVLab's original `InternVLChatModel` layout and in the
transformers-native `-hf` layout, with a tokenizer trained locally in the file set its family's real
checkpoints ship (model_runtime/loading/tiny_tokenizers.py).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from model_runtime.loading import layouts
from model_runtime.loading.tiny_tokenizers import write_tokenizer
from model_runtime.loading.tokenizer import load_tokenizer

# The LLM kinds InternVL uses: (architecture in the original layout, native model type, template).
# "llama" is InternVL2-Llama3-76B's Llama 3; "yi" is InternVL2-40B's Yi (a Llama architecture).
LLM_KINDS = {
    "qwen2": ("Qwen2ForCausalLM", "qwen2", "internvl2_5"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", "internvl2_5"),
    "internlm2": ("InternLM2ForCausalLM", "internlm2", "internlm2-chat"),
    "phi3": ("Phi3ForCausalLM", "phi3", "phi3-chat"),
    "yi": ("LlamaForCausalLM", "llama", "Hermes-2"),
    "llama": ("LlamaForCausalLM", "llama", "Hermes-2"),
}
# Phi-3-mini-128k's long-context RoPE as InternVL2-4B's llm_config writes it: type "su", the original
# context length at the top level of llm_config.
PHI3_ORIGINAL_MAX_POSITIONS = 4096
PHI3_MAX_POSITIONS = 131072


@dataclass(frozen=True)
class TinyShape:
    """Sizes of a random InternVL; `tiny` for tests, `small` for CPU benchmarks, `1b` for GPU runs."""

    vision_hidden: int
    vision_layers: int
    vision_heads: int
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_intermediate: int
    vocab_size: int
    image_size: int = 448
    patch_size: int = 14


SHAPES: dict[str, TinyShape] = {
    "tiny": TinyShape(32, 2, 2, 64, 2, 4, 2, 128, 640),
    "small": TinyShape(256, 4, 4, 512, 8, 8, 8, 1408, 4096),
    # InternVL3-1B: InternViT-300M + Qwen2.5-0.5B.
    "1b": TinyShape(1024, 24, 16, 896, 24, 14, 2, 4864, 151674),
}


def _text_config(shape: TinyShape, llm: str, tokenizer):
    from transformers import AutoConfig, LlamaConfig

    common = dict(
        vocab_size=max(shape.vocab_size, len(tokenizer)),
        hidden_size=shape.llm_hidden,
        intermediate_size=shape.llm_intermediate,
        num_hidden_layers=shape.llm_layers,
        num_attention_heads=shape.llm_heads,
        num_key_value_heads=shape.llm_kv_heads,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if llm == "internlm2":
        return LlamaConfig(rope_theta=1000000.0, attention_bias=False, **common)
    if llm == "phi3":
        head_dim = shape.llm_hidden // shape.llm_heads
        # Distinct short and long factors, so a wrong choice between them changes the logits.
        factors = {
            "short_factor": [1.0 + 0.05 * i for i in range(head_dim // 2)],
            "long_factor": [1.5 + 0.25 * i for i in range(head_dim // 2)],
        }
        common["max_position_embeddings"] = PHI3_MAX_POSITIONS
        return AutoConfig.for_model(
            "phi3",
            rope_theta=10000.0,
            rope_scaling={
                "type": "longrope",
                "factor": PHI3_MAX_POSITIONS / PHI3_ORIGINAL_MAX_POSITIONS,
                **factors,
            },
            original_max_position_embeddings=PHI3_ORIGINAL_MAX_POSITIONS,
            **common,
        )
    return AutoConfig.for_model(LLM_KINDS[llm][1], rope_theta=1000000.0, **common)


def _native_config(shape: TinyShape, llm: str, tokenizer):
    from transformers import InternVLConfig

    text = _text_config(shape, llm, tokenizer)
    vision = dict(
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_hidden * 4,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        attention_bias=True,
        use_qk_norm=False,
        norm_type="layer_norm",
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        use_mean_pooling=True,
    )
    tokens_per_tile = int((shape.image_size // shape.patch_size) ** 2 * 0.25)
    return InternVLConfig(
        vision_config=vision,
        text_config=text.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=tokens_per_tile,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def _random_model(config, seed: int):
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    # Default init leaves LayerScale at 0.1 and position embeddings at zero; randomise everything so
    # a mapping mistake anywhere changes the logits.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.08 * torch.randn(param.shape, generator=gen))
    return model


def _original_config(config, llm: str, template: str) -> dict:
    v = config.vision_config
    t = config.text_config
    vision = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_attention_heads": v.num_attention_heads,
        "num_hidden_layers": v.num_hidden_layers,
        "image_size": v.image_size[0],
        "patch_size": v.patch_size[0],
        "qkv_bias": v.attention_bias,
        "qk_normalization": v.use_qk_norm,
        "norm_type": v.norm_type,
        "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": v.hidden_act,
        "use_flash_attn": False,
        "drop_path_rate": 0.0,
        "initializer_factor": 1.0,
    }
    base = {
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_parameters["rope_theta"],
        "vocab_size": t.vocab_size,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    ids = {"bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id}
    if llm == "internlm2":
        llm_config = {
            "architectures": ["InternLM2ForCausalLM"],
            "model_type": "internlm2",
            "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
            "bias": False,
            "rope_scaling": {"type": "dynamic", "factor": 2.0},
            **ids,
            **base,
        }
    elif llm == "phi3":
        rope = t.rope_parameters
        llm_config = {
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            **ids,
            **base,
            "original_max_position_embeddings": PHI3_ORIGINAL_MAX_POSITIONS,
            "rope_scaling": {
                "type": "su",
                "long_factor": rope["long_factor"],
                "short_factor": rope["short_factor"],
            },
        }
    else:
        arch, model_type, _ = LLM_KINDS[llm]
        llm_config = {"architectures": [arch], "model_type": model_type, **base, **ids}
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "template": template,
        "downsample_ratio": config.downsample_ratio,
        "ps_version": "v2",
        "select_layer": config.vision_feature_layer,
        "force_image_size": v.image_size[0],
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "use_thumbnail": True,
        "dynamic_image_size": True,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "torch_dtype": "bfloat16",
        "vision_config": vision,
        "llm_config": llm_config,
    }


def write_tiny_checkpoint(
    path: str | os.PathLike,
    *,
    layout: str = "original",
    llm: str = "qwen2",
    size: str = "tiny",
    seed: int = 0,
    template: str | None = None,
) -> Path:
    """Write a seeded random InternVL to `path` in `layout` ("original" or "hf"); returns the path.

    The same (llm, size, seed) gives the same tensors in both layouts.
    """
    if layout not in ("original", "hf"):
        raise ValueError(f"unknown layout {layout!r}; choose original or hf")
    if size not in SHAPES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SHAPES)}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[size]
    if llm not in LLM_KINDS:
        raise ValueError(f"unknown tiny LLM kind {llm!r}; choose one of {sorted(LLM_KINDS)}")
    template = template or LLM_KINDS[llm][2]
    write_tokenizer(out, llm)
    tokenizer = load_tokenizer(out)
    config = _native_config(shape, llm, tokenizer)
    model = _random_model(config, seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if layout == "hf":
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        cfg = config.to_dict()
        cfg["architectures"] = ["InternVLForConditionalGeneration"]
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    else:
        kind = "internlm2" if llm == "internlm2" else LLM_KINDS[llm][1]
        original = layouts.native_to_original(state, llm_kind=kind, config=config)
        save_file(original, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(_original_config(config, llm, template), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return out


def demo_checkpoint_dir() -> Path:
    """Where `--model demo` keeps its generated checkpoint (under the Hugging Face cache home)."""
    root = os.environ.get("INTERNVL_DEMO_DIR") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(Path.home(), ".cache", "huggingface")), "internvl-serve-demo"
    )
    return Path(root)


def ensure_demo_checkpoint() -> str:
    """Generate the demo model (tiny, random: its answers are noise) on first use; return its path."""
    target = demo_checkpoint_dir() / "tiny-qwen2-original-v3"
    if not (target / "model.safetensors").exists():
        tmp = target.with_name(target.name + ".partial")
        write_tiny_checkpoint(tmp, layout="original", llm="qwen2", size="tiny", seed=0)
        tmp.replace(target) if not target.exists() else None
    return str(target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a deterministic random-weight InternVL checkpoint.")
    parser.add_argument("output", help="directory to write")
    parser.add_argument("--layout", choices=["original", "hf"], default="original")
    parser.add_argument("--llm", choices=sorted(LLM_KINDS), default="qwen2")
    parser.add_argument("--size", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--template", default=None, help="conversation template recorded in config.json")
    args = parser.parse_args(argv)
    path = write_tiny_checkpoint(
        args.output, layout=args.layout, llm=args.llm, size=args.size, seed=args.seed, template=args.template
    )
    print(path)


if __name__ == "__main__":
    main()
