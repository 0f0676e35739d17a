"""Deterministic random-weight InternVL checkpoints, in either layout, for tests, demos and benchmarks.

No weights can be downloaded in CI, so the real loading code is exercised on checkpoints we write
ourselves: the same tensors saved in OpenGVLab's original `InternVLChatModel` layout and in the
transformers-native `-hf` layout, with a byte-level BPE tokenizer trained locally that carries
every InternVL special token.
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

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
]
INTERNLM2_EXTRA = ["<s>", "</s>", "<unk>"]
PHI3_EXTRA = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# The LLM kinds InternVL uses, the native config class each becomes, and its default template.
LLM_KINDS = {
    "qwen2": ("Qwen2ForCausalLM", "internvl2_5"),
    "qwen3": ("Qwen3ForCausalLM", "internvl2_5"),
    "llama": ("LlamaForCausalLM", "Hermes-2"),
    "phi3": ("Phi3ForCausalLM", "phi3-chat"),
    "internlm2": ("InternLM2ForCausalLM", "internlm2-chat"),
}

# A small fixed corpus: enough merges for plausible token lengths; byte-level BPE covers any text.
_CORPUS = [
    "You are a helpful assistant. Describe the image in detail. What is in the picture?",
    "The quick brown fox jumps over the lazy dog. A red panda is eating bamboo in the video.",
    "Image-1: Image-2: Frame1: Frame2: Frame3: Frame4: Frame5: Frame6: Frame7: Frame8:",
    "Hello, who are you? Can you tell me a story? Please write a poem according to the image.",
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，",
    "英文名叫InternVL, 是一个有用无害的人工智能助手。",
    "system user assistant the a of and to in is that it for on with as was at by an be this",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 numbers, punctuation! question? colon: semicolon; quote's",
    "🐼 emoji and ünïcödé text: café, naïve, façade, 東京, 서울, Москва",
]


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


def build_tokenizer(llm: str, vocab_size: int):
    """Train a byte-level BPE tokenizer with InternVL's special tokens (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = (
        SPECIAL_TOKENS
        + (INTERNLM2_EXTRA if llm == "internlm2" else [])
        + (PHI3_EXTRA if llm == "phi3" else [])
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 4096),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if llm == "internlm2":
        # InternLM2's tokenizer adds <s> in front of every encoded text, as the original does.
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
        kwargs = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        kwargs = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    fast.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in kwargs.values()]})
    return fast


def _native_config(shape: TinyShape, llm: str, tokenizer, template: str):
    from transformers import AutoConfig, InternVLConfig, LlamaConfig

    vocab = max(shape.vocab_size, len(tokenizer))
    common = dict(
        vocab_size=vocab,
        hidden_size=shape.llm_hidden,
        intermediate_size=shape.llm_intermediate,
        num_hidden_layers=shape.llm_layers,
        num_attention_heads=shape.llm_heads,
        num_key_value_heads=shape.llm_kv_heads,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
    )
    if llm != "internlm2":
        ids = tokenizer.convert_tokens_to_ids
        common.update(bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    if llm in ("qwen2", "qwen3", "llama", "phi3"):
        text = AutoConfig.for_model(llm, rope_theta=1000000.0, tie_word_embeddings=False, **common)
    elif llm == "internlm2":
        text = LlamaConfig(
            rope_theta=1000000.0,
            tie_word_embeddings=False,
            attention_bias=False,
            bos_token_id=tokenizer.convert_tokens_to_ids("<s>"),
            eos_token_id=tokenizer.convert_tokens_to_ids("</s>"),
            **common,
        )
    else:
        raise ValueError(f"unknown tiny LLM kind {llm!r}; choose one of {sorted(LLM_KINDS)}")
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


def _original_config(config, llm: str, template: str, tokenizer) -> dict:
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
    if llm != "internlm2":
        ids = {"bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id}
        llm_config = {"architectures": [LLM_KINDS[llm][0]], "model_type": llm, **base, **ids}
    else:
        llm_config = {
            "architectures": ["InternLM2ForCausalLM"],
            "model_type": "internlm2",
            "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
            "bias": False,
            "rope_scaling": None,
            "bos_token_id": t.bos_token_id,
            "eos_token_id": t.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **base,
        }
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
    template = template or LLM_KINDS[llm][1]
    tokenizer = build_tokenizer(llm, shape.vocab_size)
    config = _native_config(shape, llm, tokenizer, template)
    model = _random_model(config, seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if layout == "hf":
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        cfg = config.to_dict()
        cfg["architectures"] = ["InternVLForConditionalGeneration"]
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    else:
        original = layouts.native_to_original(state, llm_kind=llm, config=config)
        save_file(original, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(
            json.dumps(_original_config(config, llm, template, tokenizer), indent=2)
        )
    tokenizer.save_pretrained(str(out))
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
    target = demo_checkpoint_dir() / "tiny-qwen2-original-v2"
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
