"""Multiply-accumulates and parameters, counted the way the Next-ViT paper reports them.

MACs come from running the model once under ``torch.utils.flop_counter.FlopCounterMode``, which sees
every convolution and matrix product at the ATen level, including the attention matmuls
(``q @ k^T`` and ``attn @ v`` appear as ``bmm``). The fused scaled-dot-product attention kernel that
timm's transformers use on a CPU (``_scaled_dot_product_flash_attention_for_cpu``) has no formula in
torch, so one is supplied here. Element-wise work (norms, activations, softmax, pooling) is not
counted, as in the paper's GMACs. The counter reports FLOPs = 2 x MACs; we store MACs.

Parameters are counted twice: as trained (every BatchNorm present) and in the deploy form (BatchNorms
folded, what the harness benchmarks). For Next-ViT S/B/L at 224 the harness gives 5.79 / 8.27 / 10.75
GMACs and 31.73 / 44.77 / 57.81 M deploy-form parameters (31.76 / 44.82 / 57.87 M as trained), which
reproduce the paper's 5.8 / 8.3 / 10.8 G and 31.7 / 44.8 / 57.8 M.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["FlopCount", "count_macs", "count_params", "PAPER_COMPLEXITY"]

# Paper, Table (ImageNet-1K classification at 224): GMACs and parameters (M).
PAPER_COMPLEXITY: dict[str, tuple[float, float]] = {
    "nextvit_small": (5.8, 31.7),
    "nextvit_base": (8.3, 44.8),
    "nextvit_large": (10.8, 57.8),
}


@dataclass(frozen=True)
class FlopCount:
    """Complexity of one model at one input size (per image).

    Attributes:
        macs: multiply-accumulates per image.
        params: parameters of the model as given.
        input_shape: (1, C, H, W) the count was made at.
        by_op: MACs per ATen operator (``aten.convolution``, ``aten.bmm``, ...).
    """

    macs: int
    params: int
    input_shape: tuple[int, ...]
    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def gflops(self) -> float:
        """2 x MACs, in 1e9 (what achieved-throughput figures divide by)."""
        return 2 * self.macs / 1e9

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def attention_macs(self) -> int:
        """MACs of the attention matrix products (batched matmuls and fused attention kernels)."""
        return sum(v for k, v in self.by_op.items() if "bmm" in k or "attention" in k)

    def to_dict(self) -> dict[str, Any]:
        return {"macs": self.macs, "gmacs": round(self.gmacs, 4), "params": self.params,
                "params_m": round(self.params_m, 4), "input_shape": list(self.input_shape),
                "by_op": dict(self.by_op)}


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of fused attention: (B, H, Lq, E) x (B, H, Lk, E)^T then (B, H, Lq, Lk) x (B, H, Lk, Ev)."""
    b, h, lq, e = query_shape
    lk = key_shape[-2]
    ev = value_shape[-1]
    return 2 * b * h * lq * lk * e + 2 * b * h * lq * lk * ev


def _custom_mapping() -> dict:
    aten = torch.ops.aten
    mapping = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        op = getattr(aten, name, None)
        if op is not None:
            mapping[op] = _sdpa_cpu_flops
    return mapping


@torch.no_grad()
def count_macs(model: nn.Module, image_size: tuple[int, int] = (224, 224), *, in_chans: int = 3,
               device: str | None = None) -> FlopCount:
    """Count MACs per image and parameters of ``model`` with one batch-1 forward pass.

    Args:
        model: any ``nn.Module`` taking an NCHW image batch (put in eval mode for the count).
        image_size: (height, width) in pixels. Defaults to (224, 224).
        in_chans: input channels. Defaults to 3.
        device: where to run the counting pass. Defaults to the model's parameters' device.

    Returns:
        :class:`FlopCount` (MACs per image).
    """
    from torch.utils.flop_counter import FlopCounterMode

    if device is None:
        first = next(model.parameters(), None)
        device = str(first.device) if first is not None else "cpu"
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_chans, *image_size, device=device, dtype=dtype)
    try:
        with FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
            model(x)
    finally:
        model.train(was_training)
    by_op = {str(k): int(v) // 2 for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return FlopCount(macs=int(counter.get_total_flops()) // 2, params=count_params(model),
                     input_shape=tuple(x.shape), by_op=dict(sorted(by_op.items())))
