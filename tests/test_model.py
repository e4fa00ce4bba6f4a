"""The reference model: architecture facts, any input size, backbone mode, clear size errors."""
from __future__ import annotations

import pytest
import torch

from nextvit_model import (
    VARIANTS,
    InputSizeError,
    NextViT,
    UnknownVariantError,
    create_model,
    resolve_variant,
    stage_resolutions,
)

from conftest import SMALL_DEPTHS


@pytest.mark.parametrize("variant,params_m", [("nextvit_small", 31.76), ("nextvit_base", 44.82),
                                              ("nextvit_large", 57.87)])
def test_parameter_counts_match_the_paper(variant, params_m):
    model = create_model(variant)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == params_m
    assert VARIANTS[variant].params_m == params_m


def test_architecture_facts_of_small():
    m = create_model("s")
    assert m.depths == (3, 4, 10, 3)
    assert [s.blocks[-1].mlp.fc2.out_channels for s in m.stages] == [96, 256, 512, 1024]
    assert [m.stem[i].conv.out_channels for i in range(4)] == [64, 32, 64, 64]
    ntb = m.stages[2].blocks[4]
    assert ntb.mhsa_out_chs == 384 and ntb.mhca_out_chs == 128  # mix ratio 0.75 rounded to 32
    assert ntb.e_mhsa.sr_ratio == 2 and ntb.e_mhsa.pool_size == 4 and ntb.e_mhsa.num_heads == 12
    assert isinstance(ntb.e_mhsa.sr, torch.nn.AvgPool1d) and isinstance(ntb.e_mhsa.norm, torch.nn.BatchNorm1d)
    assert m.stages[1].blocks[-1].e_mhsa.sr_ratio == 4 and m.stages[3].blocks[-1].e_mhsa.sr is None
    assert m.stages[0].blocks[0].mlp.fc1.out_channels == 288  # NCB mlp ratio 3
    assert m.stages[3].blocks[-1].mlp.fc1.out_channels == 2048  # NTB mlp ratio 2
    bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(bn.eps == 1e-5 for bn in bns)
    acts = [a for a in m.modules() if isinstance(a, (torch.nn.ReLU, torch.nn.GELU, torch.nn.SiLU, torch.nn.Hardswish))]
    assert len(acts) > 0 and all(isinstance(a, torch.nn.ReLU) for a in acts)


@pytest.mark.parametrize("alias,name", [("s", "nextvit_small"), ("Next-ViT-B", "nextvit_base"), ("large", "nextvit_large")])
def test_variant_aliases(alias, name):
    assert resolve_variant(alias).name == name


def test_unknown_variant_suggests_a_fix():
    with pytest.raises(UnknownVariantError, match="did you mean 'nextvit_small'"):
        resolve_variant("nextvit_smal")


@pytest.mark.parametrize("size", [(224, 224), (256, 320), (250, 250), (97, 131)])
def test_any_processable_size_runs(small_model, size):
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert small_model(x).shape == (2, 1000)


def test_backbone_returns_four_stage_maps(small_backbone):
    x = torch.randn(1, 3, 256, 320)
    with torch.no_grad():
        feats = small_backbone(x)
    assert [f.shape[1] for f in feats] == [96, 256, 512, 1024]
    assert [tuple(f.shape[2:]) for f in feats] == [(64, 80), (32, 40), (16, 20), (8, 10)]
    assert [fi["reduction"] for fi in small_backbone.feature_info] == [4, 8, 16, 32]
    assert stage_resolutions(256, 320) == [(64, 80), (32, 40), (16, 20), (8, 10)]


def test_odd_sizes_follow_ceil_mode_pooling():
    assert stage_resolutions(250, 250) == [(63, 63), (32, 32), (16, 16), (8, 8)]


def test_too_small_input_names_the_minimum(small_model):
    assert small_model.min_input_size() == 25
    with pytest.raises(InputSizeError, match=r"too small.*use at least 25x25"):
        small_model(torch.randn(1, 3, 16, 16))
    with torch.no_grad():
        small_model(torch.randn(1, 3, 25, 25))


def test_wrong_channel_count_is_a_clear_error(small_model):
    with pytest.raises(InputSizeError, match=r"expected an input of shape \(batch, 3, height, width\)"):
        small_model(torch.randn(1, 1, 64, 64))


def test_bad_depths_are_rejected():
    with pytest.raises(ValueError, match="multiple of 5"):
        NextViT((1, 1, 4, 1))


def test_small_depths_model_has_every_block_type():
    m = create_model("s", depths=SMALL_DEPTHS)
    kinds = {type(b).__name__ for s in m.stages for b in s.blocks}
    assert kinds == {"NextConvBlock", "NextTransformerBlock"}
