"""flops.count_macs: hand-checkable counts, attention matmuls, and the paper's Next-ViT complexity."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nextvit_deploy._deps import available
from nextvit_deploy.flops import PAPER_COMPLEXITY, count_macs, count_params
from nextvit_deploy.fuse import fuse_model


def test_conv_and_linear_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5))
    c = count_macs(model, (8, 8))
    assert c.macs == 8 * 3 * 9 * 64 + 8 * 5  # conv: out_ch x in_ch x k*k x H*W; linear: in x out
    assert c.params == count_params(model) == 8 * 3 * 9 + 8 + 8 * 5 + 5
    assert c.input_shape == (1, 3, 8, 8)


class _Attention(nn.Module):
    """Tokens from a 1x1 conv, then attention: explicit matmuls or the fused SDPA kernel."""

    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused
        self.proj = nn.Conv2d(3, 16, 1, bias=False)

    def forward(self, x):
        t = self.proj(x).flatten(2).transpose(1, 2).reshape(1, -1, 2, 8).transpose(1, 2)  # (1, 2 heads, N, 8)
        if self.fused:
            return F.scaled_dot_product_attention(t, t, t)
        return (t @ t.transpose(-2, -1)).softmax(-1) @ t


@pytest.mark.parametrize("fused", [False, True])
def test_attention_matmuls_are_counted(fused):
    n = 6 * 6
    c = count_macs(_Attention(fused), (6, 6))
    proj = 16 * 3 * n
    attention = 2 * (2 * n * n * 8)  # heads x (q k^T + attn v)
    assert c.macs == proj + attention
    assert c.attention_macs == attention


@pytest.mark.parametrize("variant", ["nextvit_small", "nextvit_base", "nextvit_large"])
def test_nextvit_reproduces_paper_complexity(variant):
    from nextvit_model import create_model

    with torch.device("meta"):  # architecture only: no weights are initialised or computed on
        model = create_model(variant)
    c = count_macs(model, (224, 224))
    gmacs, params_m = PAPER_COMPLEXITY[variant]
    assert round(c.gmacs, 1) == gmacs
    assert c.by_op.get("aten.bmm", 0) > 0 and c.attention_macs > 0  # E-MHSA's q k^T and attn v
    deploy = fuse_model(model, inplace=True).model
    assert round(count_params(deploy) / 1e6, 1) == params_m  # the deploy form (BatchNorms folded)
    assert int(c.params_m * 10) / 10 == params_m  # as trained, truncated the way the paper prints it
    assert count_macs(deploy, (224, 224)).macs == c.macs  # folding BatchNorms does not change MACs


@pytest.mark.skipif(not available("timm"), reason="timm is not installed (pip install 'nextvit-deploy[timm]')")
def test_timm_transformer_with_fused_attention():
    import timm

    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    c = count_macs(model, (224, 224))
    assert round(c.gmacs, 1) == 4.6  # DeiT-S as published
    assert any("attention" in k for k in c.by_op)


def test_to_dict_roundtrip():
    c = count_macs(nn.Conv2d(3, 4, 1), (2, 2))
    d = c.to_dict()
    assert d["macs"] == 4 * 3 * 4 and d["input_shape"] == [1, 3, 2, 2]
