"""CPU: the language model's linear layers on oneDNN, their weights packed once at start-up.

PyTorch runs a CPU `nn.Linear` through MKL's GEMM on the row-major weight. For the few rows of a
decode step that reads the weights at a fraction of the memory bandwidth: measured on the `small`
model's 57 matrices (108 MB, out of cache), 2 cores: 11.5 GB/s at one row, against 22.3 GB/s for
oneDNN's matmul on a weight reordered into its blocked layout once (`_reorder_linear_weight`,
what PyTorch's own compiler uses for CPU linears). The packed form was also faster at 32 rows
(15 vs 25 ms for all matrices) and at 256 (71 vs 92 ms). A decode step reads every weight, so this
is most of the step at low concurrency.

Only plain `nn.Linear` modules are replaced: the decoder layers', the vision tower's and the
projector's (a vision tile runs ~1,000 rows through them), and the output projection when its
weight is not the input embeddings' (a tied one would need both layouts). The packed weight
takes the original's place, so memory does not grow. Results equal the original's to float
rounding (max |diff| ~1e-5 in fp32); the engine and anything else that runs the same modules
(`generate()` in the parity tests) compute the same numbers. Without oneDNN (PyTorch builds for
other CPUs) nothing is replaced.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward, on a oneDNN-packed copy of its weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.register_buffer("packed", packed, persistent=False)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        """The packed weight: right shape, dtype and device; its values only oneDNN reads."""
        return self.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module) -> int:
    """Replace the plain linear layers of an InternVL's decoder layers, vision tower and projector
    (and its output projection, if untied) with PackedLinear; return how many were replaced (0
    where oneDNN cannot run them)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return 0
    inner = model.model
    lm = inner.language_model
    targets: list[tuple[nn.Module, str, nn.Linear]] = []
    for root in (lm.layers, inner.vision_tower, inner.multi_modal_projector):
        for owner in root.modules():
            for name, child in owner.named_children():
                if type(child) is nn.Linear:  # not quantized or otherwise specialised subclasses
                    targets.append((owner, name, child))
    head = model.get_output_embeddings()
    if type(head) is nn.Linear and head.weight is not lm.get_input_embeddings().weight:
        targets.append((model, "lm_head", head))
    if not targets or targets[0][2].weight.dtype not in (torch.float32, torch.bfloat16):
        return 0
    owner, name, linear = targets[0]
    try:
        probe = PackedLinear(linear)
        probe(torch.zeros(1, probe.in_features, dtype=linear.weight.dtype))
    except RuntimeError:
        log.warning("oneDNN cannot run this model's linear layers; keeping PyTorch's", exc_info=True)
        return 0
    setattr(owner, name, probe)
    for owner, name, linear in targets[1:]:  # one at a time: the originals go as their copies come
        setattr(owner, name, PackedLinear(linear))
    return len(targets)
