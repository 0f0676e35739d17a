"""Weight-name mappings between OpenGVLab's original InternVL layout and transformers' native classes.

The original `InternVLChatModel` stores `vision_model.*`, `mlp1.*` and `language_model.*` with fused
attention projections; transformers' `InternVLForConditionalGeneration` wants split q/k/v and its own
names. `original_to_native` is applied tensor by tensor while loading; `native_to_original` is its
inverse, used only to write test checkpoints in the original layout.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

_VISION_RENAMES: list[tuple[str, str]] = [
    (r"^vision_model\.embeddings\.class_embedding$", "model.vision_tower.embeddings.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "model.vision_tower.embeddings.position_embeddings"),
    (
        r"^vision_model\.embeddings\.patch_embedding\.(weight|bias)$",
        r"model.vision_tower.embeddings.patch_embeddings.projection.\1",
    ),
    (
        r"^vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.",
        r"model.vision_tower.encoder.layer.\1.attention.projection_layer.",
    ),
    (
        r"^vision_model\.encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.",
        r"model.vision_tower.encoder.layer.\1.attention.\2.",
    ),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls1$", r"model.vision_tower.encoder.layer.\1.lambda_1"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls2$", r"model.vision_tower.encoder.layer.\1.lambda_2"),
    (
        r"^vision_model\.encoder\.layers\.(\d+)\.norm1\.",
        r"model.vision_tower.encoder.layer.\1.layernorm_before.",
    ),
    (
        r"^vision_model\.encoder\.layers\.(\d+)\.norm2\.",
        r"model.vision_tower.encoder.layer.\1.layernorm_after.",
    ),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"model.vision_tower.encoder.layer.\1.mlp."),
    (r"^mlp1\.0\.", "model.multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "model.multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "model.multi_modal_projector.linear_2."),
]

_LLM_RENAMES: list[tuple[str, str]] = [
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
]

# InternLM2 names inside `language_model.` (applied before the generic LLM renames).
_INTERNLM2_RENAMES: list[tuple[str, str]] = [
    (r"^language_model\.model\.tok_embeddings\.", "model.language_model.embed_tokens."),
    (r"^language_model\.output\.", "lm_head."),
    (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
]

# Older `-hf` exports put the sub-models at the top level.
_HF_LEGACY_RENAMES: list[tuple[str, str]] = [
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
]

_VISION_QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")
_INTERNLM2_WQKV = re.compile(r"^language_model\.model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)$")


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def split_internlm2_wqkv(
    tensor: torch.Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split InternLM2's fused wqkv, grouped per KV head as (kv_heads, groups + 2, head_dim, ...)."""
    groups = num_heads // num_kv_heads
    rest = tensor.shape[1:]
    grouped = tensor.reshape(num_kv_heads, groups + 2, head_dim, *rest)
    q = grouped[:, :groups].reshape(num_heads * head_dim, *rest)
    k = grouped[:, -2].reshape(num_kv_heads * head_dim, *rest)
    v = grouped[:, -1].reshape(num_kv_heads * head_dim, *rest)
    return q, k, v


def fuse_internlm2_wqkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int
) -> torch.Tensor:
    """Inverse of `split_internlm2_wqkv`."""
    groups = num_heads // num_kv_heads
    rest = q.shape[1:]
    qg = q.reshape(num_kv_heads, groups, head_dim, *rest)
    kg = k.reshape(num_kv_heads, 1, head_dim, *rest)
    vg = v.reshape(num_kv_heads, 1, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def original_to_native(
    key: str, tensor: torch.Tensor, *, llm_kind: str, num_heads: int, num_kv_heads: int, head_dim: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Map one original-layout tensor to one or more native (name, tensor) pairs."""
    if m := _VISION_QKV.match(key):
        layer, kind = m.groups()
        for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
            yield f"model.vision_tower.encoder.layer.{layer}.attention.{name}.{kind}", part
        return
    if llm_kind == "internlm2":
        if m := _INTERNLM2_WQKV.match(key):
            layer, kind = m.groups()
            parts = split_internlm2_wqkv(
                tensor, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim
            )
            for name, part in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
                yield f"model.language_model.layers.{layer}.self_attn.{name}.{kind}", part
            return
        key = _rename(key, _INTERNLM2_RENAMES)
    if key.startswith(("vision_model.", "mlp1.")):
        yield _rename(key, _VISION_RENAMES), tensor
    else:
        yield _rename(key, _LLM_RENAMES), tensor


def hf_legacy_to_native(key: str) -> str:
    """Normalise names of older `-hf` exports to the current native layout."""
    return _rename(key, _HF_LEGACY_RENAMES)


# Inverse renames, used only to write test checkpoints in the original layout.
_VISION_BACK: list[tuple[str, str]] = [
    (r"^model\.vision_tower\.embeddings\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^model\.vision_tower\.embeddings\.position_embeddings$", "vision_model.embeddings.position_embedding"),
    (
        r"^model\.vision_tower\.embeddings\.patch_embeddings\.projection\.",
        "vision_model.embeddings.patch_embedding.",
    ),
    (
        r"^model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.projection_layer\.",
        r"vision_model.encoder.layers.\1.attn.proj.",
    ),
    (
        r"^model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.(q_norm|k_norm)\.",
        r"vision_model.encoder.layers.\1.attn.\2.",
    ),
    (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.lambda_1$", r"vision_model.encoder.layers.\1.ls1"),
    (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.lambda_2$", r"vision_model.encoder.layers.\1.ls2"),
    (
        r"^model\.vision_tower\.encoder\.layer\.(\d+)\.layernorm_before\.",
        r"vision_model.encoder.layers.\1.norm1.",
    ),
    (
        r"^model\.vision_tower\.encoder\.layer\.(\d+)\.layernorm_after\.",
        r"vision_model.encoder.layers.\1.norm2.",
    ),
    (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (r"^model\.multi_modal_projector\.layer_norm\.", "mlp1.0."),
    (r"^model\.multi_modal_projector\.linear_1\.", "mlp1.1."),
    (r"^model\.multi_modal_projector\.linear_2\.", "mlp1.3."),
]
_LLM_BACK: list[tuple[str, str]] = [
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
]
_INTERNLM2_BACK: list[tuple[str, str]] = [
    (r"^model\.language_model\.embed_tokens\.", "language_model.model.tok_embeddings."),
    (r"^lm_head\.", "language_model.output."),
    (r"\.self_attn\.o_proj\.", ".attention.wo."),
    (r"\.mlp\.gate_proj\.", ".feed_forward.w1."),
    (r"\.mlp\.up_proj\.", ".feed_forward.w3."),
    (r"\.mlp\.down_proj\.", ".feed_forward.w2."),
    (r"\.input_layernorm\.", ".attention_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"^model\.language_model\.", "language_model.model."),
]
_NATIVE_QKV = re.compile(
    r"^(model\.vision_tower\.encoder\.layer\.(\d+)\.attention|model\.language_model\.layers\.(\d+)\.self_attn)"
    r"\.([qkv])_proj\.(weight|bias)$"
)


def native_to_original(state: dict[str, torch.Tensor], *, llm_kind: str, config) -> dict[str, torch.Tensor]:
    """Write a native state dict in the original layout (fusing q/k/v back)."""
    text = config.text_config
    num_heads, num_kv = text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    out: dict[str, torch.Tensor] = {}
    pending: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _NATIVE_QKV.match(key)
        if m and (m.group(2) is not None or llm_kind == "internlm2"):
            _, vis_layer, llm_layer, which, kind = m.groups()
            slot = ("vision", vis_layer, kind) if vis_layer is not None else ("llm", llm_layer, kind)
            pending.setdefault(slot, {})[which] = tensor
        elif key.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
            out[_rename(key, _VISION_BACK)] = tensor
        else:
            out[_rename(key, _INTERNLM2_BACK if llm_kind == "internlm2" else _LLM_BACK)] = tensor
    for (part, layer, kind), qkv in pending.items():
        if part == "vision":
            out[f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat(
                [qkv["q"], qkv["k"], qkv["v"]]
            )
        else:
            out[f"language_model.model.layers.{layer}.attention.wqkv.{kind}"] = fuse_internlm2_wqkv(
                qkv["q"], qkv["k"], qkv["v"], num_heads=num_heads, num_kv_heads=num_kv, head_dim=head_dim
            )
    return {k: v.contiguous() for k, v in out.items()}
