"""config.json -> transformers' InternVLConfig, for both layouts, without running checkpoint code.

The original layout (`InternVLChatModel`) nests `vision_config` and `llm_config` in its own vocabulary;
both are mapped onto the native classes' fields here. The `-hf` layout is read as is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_runtime.errors import CheckpointError

ORIGINAL_ARCHS = {"InternVLChatModel"}
HF_ARCHS = {"InternVLForConditionalGeneration"}
# LLM kinds of the original layout and the native config type each maps onto.
LLM_KINDS = {
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "llama": "llama",
    "phi3": "phi3",
    "internlm2": "llama",
}


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"missing file {path}: a checkpoint needs it")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot parse {path}: {exc}") from None


def detect_layout(config: dict, config_path: Path) -> str:
    archs = set(config.get("architectures") or [])
    if archs & ORIGINAL_ARCHS or config.get("model_type") == "internvl_chat":
        return "original"
    if archs & HF_ARCHS or config.get("model_type") == "internvl":
        return "hf"
    raise CheckpointError(
        f"{config_path}: unknown architecture {sorted(archs) or config.get('model_type')!r}; expected "
        f"{sorted(ORIGINAL_ARCHS | HF_ARCHS)} (InternVL checkpoints in the original or -hf layout)"
    )


def _llm_kind(llm_config: dict, config_path: Path) -> str:
    kind = llm_config.get("model_type")
    arch = (llm_config.get("architectures") or [""])[0]
    if kind not in LLM_KINDS:
        raise CheckpointError(
            f"{config_path}: unsupported LLM {kind or arch!r} in llm_config; supported: {sorted(LLM_KINDS)}"
        )
    return kind


def _text_config_from_original(llm: dict, kind: str):
    from transformers import AutoConfig

    drop = {
        "architectures",
        "auto_map",
        "_name_or_path",
        "attn_implementation",
        "torch_dtype",
        "transformers_version",
    }
    fields = {k: v for k, v in llm.items() if k not in drop}
    if kind == "internlm2":
        # InternLM2 is Llama with fused weights; only the names differ (see layouts).
        fields = {
            "vocab_size": llm["vocab_size"],
            "hidden_size": llm["hidden_size"],
            "intermediate_size": llm["intermediate_size"],
            "num_hidden_layers": llm["num_hidden_layers"],
            "num_attention_heads": llm["num_attention_heads"],
            "num_key_value_heads": llm.get("num_key_value_heads", llm["num_attention_heads"]),
            "max_position_embeddings": llm.get("max_position_embeddings", 32768),
            "rms_norm_eps": llm.get("rms_norm_eps", 1e-6),
            "rope_theta": llm.get("rope_theta", 10000.0),
            "rope_scaling": llm.get("rope_scaling"),
            "attention_bias": bool(llm.get("bias", False)),
            "hidden_act": llm.get("hidden_act", "silu"),
            "tie_word_embeddings": bool(llm.get("tie_word_embeddings", False)),
            "bos_token_id": llm.get("bos_token_id", 1),
            "eos_token_id": llm.get("eos_token_id", 2),
            "pad_token_id": llm.get("pad_token_id"),
        }
    if kind == "phi3":
        fields["rope_scaling"] = _phi3_rope(fields.get("rope_scaling"), fields)
    fields.pop("model_type", None)
    return AutoConfig.for_model(LLM_KINDS[kind], **fields)


def _phi3_rope(rope: dict | None, fields: dict) -> dict | None:
    """Phi-3-mini-128k's RoPE in transformers 5's words.

    InternVL2-4B's llm_config writes it as the Phi-3 code it ships expects: type "su" ("scaled
    uniform", the name of Phi-3's LongRoPE before transformers adopted it as "longrope"), with
    `original_max_position_embeddings` at the top level of llm_config, where transformers also reads
    it. transformers 5 knows only "longrope", and computes the same frequencies and attention factor
    (tests/test_checkpoint.py checks them against Phi-3's formulas).
    """
    if not rope or rope.get("type", rope.get("rope_type")) != "su":
        return rope
    rope = {k: v for k, v in rope.items() if k != "rope_type"}
    rope["type"] = "longrope"
    original = fields.get("original_max_position_embeddings")
    if original and "factor" not in rope:
        # Phi-3's scale: the extended over the original context (transformers asks for it by name).
        rope["factor"] = fields.get("max_position_embeddings", original) / original
    return rope


def _vision_config_from_original(vision: dict, image_size: int) -> dict:
    return {
        "hidden_size": vision["hidden_size"],
        "intermediate_size": vision["intermediate_size"],
        "num_hidden_layers": vision["num_hidden_layers"],
        "num_attention_heads": vision["num_attention_heads"],
        "image_size": image_size,
        "patch_size": vision.get("patch_size", 14),
        "attention_bias": bool(vision.get("qkv_bias", True)),
        "use_qk_norm": bool(vision.get("qk_normalization", False)),
        "norm_type": vision.get("norm_type", "layer_norm"),
        "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
        "hidden_act": vision.get("hidden_act", "gelu"),
        "use_mean_pooling": True,  # InternViT has no final norm; this makes the native one an Identity
    }


@dataclass(frozen=True)
class ParsedConfig:
    config: Any  # InternVLConfig
    layout: str
    llm_kind: str
    template_name: str | None
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool


def parse_config(path: Path) -> ParsedConfig:
    """Read config.json (never executing code) and map it onto InternVLConfig."""
    from transformers import InternVLConfig

    config_path = path / "config.json"
    raw = read_json(config_path)
    layout = detect_layout(raw, config_path)
    if layout == "hf":
        try:
            config = InternVLConfig.from_dict({k: v for k, v in raw.items() if k != "auto_map"})
        except Exception as exc:  # noqa: BLE001 - surface as a checkpoint problem
            raise CheckpointError(
                f"{config_path}: invalid InternVL config ({type(exc).__name__}: {exc})"
            ) from None
        kind = config.text_config.model_type
        return ParsedConfig(
            config, layout, kind, raw.get("template"), 1, raw.get("max_dynamic_patch", 12), True
        )
    for key in ("vision_config", "llm_config"):
        if not isinstance(raw.get(key), dict):
            raise CheckpointError(f"{config_path}: missing {key!r} (original InternVL layout)")
    if raw.get("ps_version", "v2") != "v2":
        raise CheckpointError(
            f"{config_path}: ps_version {raw.get('ps_version')!r} is not supported (expected 'v2')"
        )
    kind = _llm_kind(raw["llm_config"], config_path)
    image_size = raw.get("force_image_size") or raw["vision_config"].get("image_size", 448)
    text = _text_config_from_original(raw["llm_config"], kind)
    patch = raw["vision_config"].get("patch_size", 14)
    ratio = raw.get("downsample_ratio", 0.5)
    config = InternVLConfig(
        vision_config=_vision_config_from_original(raw["vision_config"], image_size),
        text_config=text.to_dict(),
        image_token_id=0,  # set from the tokenizer once it is loaded
        image_seq_length=int((image_size // patch) ** 2 * ratio**2),
        downsample_ratio=ratio,
        vision_feature_layer=raw.get("select_layer", -1),
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=bool(text.tie_word_embeddings),
    )
    if not raw.get("template"):
        raise CheckpointError(f"{config_path}: missing 'template' (original InternVL layout)")
    return ParsedConfig(
        config,
        layout,
        kind,
        raw["template"],
        int(raw.get("min_dynamic_patch", 1)),
        int(raw.get("max_dynamic_patch", 12)),
        bool(raw.get("use_thumbnail", True)),
    )
