"""Optional 8-bit / 4-bit weights for the language model, through bitsandbytes (the `quant` extra).

Only the LLM's linear layers are quantized: the vision tower, the projector, the embeddings and
the output head stay in the compute dtype, as transformers' own bitsandbytes integration leaves
`lm_head` alone. Layers are quantized one at a time on their way to the device, so the full
precision model never has to fit on the GPU.
"""

from __future__ import annotations

import torch
from torch import nn

from model_runtime.errors import CheckpointError

MODES = ("8bit", "4bit")


def quantize_language_model(model, mode: str, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Replace every nn.Linear of `model.model.language_model` in place; returns how many."""
    if mode not in MODES:
        raise CheckpointError(f"unknown quantization {mode!r}; choose one of {list(MODES)}")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise CheckpointError(
            f"quantization {mode!r} needs bitsandbytes: pip install 'internvl-serve[quant]'"
        ) from None
    count = 0
    for parent in list(model.model.language_model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            setattr(parent, name, _quantized(bnb, child, mode, compute_dtype, device))
            count += 1
    return count


def _quantized(
    bnb, linear: nn.Linear, mode: str, compute_dtype: torch.dtype, device: torch.device
) -> nn.Module:
    weight = linear.weight.data.to("cpu")
    has_bias = linear.bias is not None
    if mode == "8bit":
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            quant_type="nf4",
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data.to("cpu", compute_dtype), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes the weight as it moves to the device
