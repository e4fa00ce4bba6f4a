"""Independent oracle: the reference model equals timm's Next-ViT on the same weights.

Every BatchNorm carries random affine parameters and running statistics gathered on real photos
(``random_model``), so a wrong normalisation, scaling or reshape shows up in the logits.
"""
from __future__ import annotations

import pytest
import torch

from nextvit_deploy.reference import random_model

from conftest import photo_batch, requires

pytestmark = requires("timm")


def _timm_twin(name: str, ours: torch.nn.Module) -> torch.nn.Module:
    import timm

    twin = timm.create_model(name, pretrained=False).eval()
    twin.load_state_dict(ours.state_dict(), strict=True)  # same key layout: a strict load must succeed
    return twin


@pytest.mark.parametrize("size", [(224, 224), (256, 320)])
def test_small_equals_timm(s_model, size):
    twin = _timm_twin("nextvit_small", s_model)
    x = photo_batch(2, size)
    with torch.no_grad():
        ours, theirs = s_model(x), twin(x)
    assert ours.shape == theirs.shape == (2, 1000)
    assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max()


@pytest.mark.parametrize("variant", ["nextvit_base", "nextvit_large"])
def test_base_and_large_equal_timm(variant):
    ours = random_model(variant, seed=1)
    twin = _timm_twin(variant, ours)
    x = photo_batch(1, 224)
    with torch.no_grad():
        a, b = ours(x), twin(x)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_backbone_equals_timm_intermediates(s_model):
    from nextvit_model import create_model

    backbone = create_model("s", features_only=True)
    backbone.load_state_dict({k: v for k, v in s_model.state_dict().items()
                              if not k.startswith(("head.", "norm."))})
    twin = _timm_twin("nextvit_small", s_model)
    x = photo_batch(1, (256, 320))
    with torch.no_grad():
        ours = backbone(x)
        theirs = twin.forward_intermediates(x, intermediates_only=True)
    assert len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
