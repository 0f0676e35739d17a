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

# Renames as (original name, native name, how it matches): "prefix" rewrites the start of a name,
# "whole" a whole name, "infix" a piece anywhere in it; "{i}" stands for a layer number. One table
# per part serves both directions (see _compile), so the inverse cannot drift from the mapping.
_Rule = tuple[str, str, str]

_VISION: list[_Rule] = [
    ("vision_model.embeddings.class_embedding", "model.vision_tower.embeddings.cls_token", "whole"),
    (
        "vision_model.embeddings.position_embedding",
        "model.vision_tower.embeddings.position_embeddings",
        "whole",
    ),
    (
        "vision_model.embeddings.patch_embedding.",
        "model.vision_tower.embeddings.patch_embeddings.projection.",
        "prefix",
    ),
    (
        "vision_model.encoder.layers.{i}.attn.proj.",
        "model.vision_tower.encoder.layer.{i}.attention.projection_layer.",
        "prefix",
    ),
    (
        "vision_model.encoder.layers.{i}.attn.q_norm.",
        "model.vision_tower.encoder.layer.{i}.attention.q_norm.",
        "prefix",
    ),
    (
        "vision_model.encoder.layers.{i}.attn.k_norm.",
        "model.vision_tower.encoder.layer.{i}.attention.k_norm.",
        "prefix",
    ),
    ("vision_model.encoder.layers.{i}.ls1", "model.vision_tower.encoder.layer.{i}.lambda_1", "whole"),
    ("vision_model.encoder.layers.{i}.ls2", "model.vision_tower.encoder.layer.{i}.lambda_2", "whole"),
    (
        "vision_model.encoder.layers.{i}.norm1.",
        "model.vision_tower.encoder.layer.{i}.layernorm_before.",
        "prefix",
    ),
    (
        "vision_model.encoder.layers.{i}.norm2.",
        "model.vision_tower.encoder.layer.{i}.layernorm_after.",
        "prefix",
    ),
    ("vision_model.encoder.layers.{i}.mlp.", "model.vision_tower.encoder.layer.{i}.mlp.", "prefix"),
    ("mlp1.0.", "model.multi_modal_projector.layer_norm.", "prefix"),
    ("mlp1.1.", "model.multi_modal_projector.linear_1.", "prefix"),
    ("mlp1.3.", "model.multi_modal_projector.linear_2.", "prefix"),
]

_LLM: list[_Rule] = [
    ("language_model.model.", "model.language_model.", "prefix"),
    ("language_model.lm_head.", "lm_head.", "prefix"),
]

# An InternLM2 LLM's names, in place of _LLM (its specific prefixes before the generic one).
_INTERNLM2: list[_Rule] = [
    ("language_model.model.tok_embeddings.", "model.language_model.embed_tokens.", "prefix"),
    ("language_model.output.", "lm_head.", "prefix"),
    (".attention.wo.", ".self_attn.o_proj.", "infix"),
    (".feed_forward.w1.", ".mlp.gate_proj.", "infix"),
    (".feed_forward.w3.", ".mlp.up_proj.", "infix"),
    (".feed_forward.w2.", ".mlp.down_proj.", "infix"),
    (".attention_norm.", ".input_layernorm.", "infix"),
    (".ffn_norm.", ".post_attention_layernorm.", "infix"),
    ("language_model.model.", "model.language_model.", "prefix"),
]

# Older `-hf` exports put the sub-models at the top level (one way only: nothing writes them).
_HF_LEGACY: list[_Rule] = [
    ("language_model.model.", "model.language_model.", "prefix"),
    ("language_model.lm_head.", "lm_head.", "prefix"),
    ("vision_tower.", "model.vision_tower.", "prefix"),
    ("multi_modal_projector.", "model.multi_modal_projector.", "prefix"),
]


def _compile(rules: list[_Rule], *, backward: bool = False) -> list[tuple[re.Pattern[str], str]]:
    """(pattern, replacement) pairs mapping original names to native ones, or back. Applied in the
    same order both ways: a specific rule comes before the generic prefix it would otherwise meet."""
    compiled = []
    for original, native, how in rules:
        source, target = (native, original) if backward else (original, native)
        body = re.escape(source).replace(re.escape("{i}"), r"(\d+)")
        pattern = {"prefix": f"^{body}", "whole": f"^{body}$", "infix": body}[how]
        compiled.append((re.compile(pattern), target.replace("{i}", r"\1")))
    return compiled


_VISION_RENAMES = _compile(_VISION)
_LLM_RENAMES = _compile(_LLM)
_INTERNLM2_RENAMES = _compile(_INTERNLM2)
_HF_LEGACY_RENAMES = _compile(_HF_LEGACY)
_VISION_BACK = _compile(_VISION, backward=True)
_LLM_BACK = _compile(_LLM, backward=True)
_INTERNLM2_BACK = _compile(_INTERNLM2, backward=True)

_VISION_QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")
_INTERNLM2_WQKV = re.compile(r"^language_model\.model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)$")


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, repl in rules:
        key = pattern.sub(repl, key)
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
    if llm_kind == "internlm2" and (m := _INTERNLM2_WQKV.match(key)):
        layer, kind = m.groups()
        parts = split_internlm2_wqkv(
            tensor, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim
        )
        for name, part in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
            yield f"model.language_model.layers.{layer}.self_attn.{name}.{kind}", part
        return
    if key.startswith(("vision_model.", "mlp1.")):
        yield _rename(key, _VISION_RENAMES), tensor
    else:
        yield _rename(key, _INTERNLM2_RENAMES if llm_kind == "internlm2" else _LLM_RENAMES), tensor


def hf_legacy_to_native(key: str) -> str:
    """Normalise names of older `-hf` exports to the current native layout."""
    return _rename(key, _HF_LEGACY_RENAMES)


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
