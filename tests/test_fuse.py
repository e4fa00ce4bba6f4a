"""The deploy form: every BatchNorm folded, outputs unchanged, caller's model untouched, idempotent."""
from __future__ import annotations

import copy

import pytest
import torch

from nextvit_deploy.fuse import count_batchnorms, fuse_model

from conftest import max_rel_diff, photo_batch


def _bn_is_not_identity(model):
    # Fusion tests are meaningless with identity BatchNorm: the fixtures carry realistic statistics.
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns
    assert all(not torch.allclose(bn.running_var, torch.ones_like(bn.running_var)) for bn in bns)
    assert all(not torch.allclose(bn.weight, torch.ones_like(bn.weight)) for bn in bns)


def test_full_small_model_folds_every_batchnorm(s_model, photos224):
    _bn_is_not_identity(s_model)
    before = count_batchnorms(s_model)
    result = fuse_model(s_model)
    assert result.remaining == 0 and result.folded == before == 61
    with torch.no_grad():
        ref, fused = s_model(photos224), result.model(photos224)
    assert max_rel_diff(ref, fused) <= 1e-5


@pytest.mark.parametrize("size", [(224, 224), (256, 320), (97, 131)])
def test_fused_matches_unfused_at_several_sizes(small_model, size):
    x = photo_batch(3, size)
    fused = fuse_model(small_model).model
    with torch.no_grad():
        assert max_rel_diff(small_model(x), fused(x)) <= 1e-5


def test_backbone_output_norms_become_affine(small_backbone):
    _bn_is_not_identity(small_backbone)
    result = fuse_model(small_backbone)
    assert result.remaining == 0
    x = photo_batch(2, 224)
    with torch.no_grad():
        for a, b in zip(small_backbone(x), result.model(x)):
            assert max_rel_diff(a, b) <= 1e-5


def test_fusion_never_mutates_the_callers_model(small_model):
    state = copy.deepcopy(small_model.state_dict())
    n_bn = count_batchnorms(small_model)
    fuse_model(small_model)
    assert count_batchnorms(small_model) == n_bn
    after = small_model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)


def test_fusion_is_idempotent(small_model):
    once = fuse_model(small_model).model
    twice = fuse_model(once)
    assert twice.folded == 0 and twice.remaining == 0
    x = photo_batch(2, 224)
    with torch.no_grad():
        assert torch.equal(once(x), twice.model(x))


def test_inplace_fusion_changes_the_model(small_model):
    target = copy.deepcopy(small_model)
    result = fuse_model(target, inplace=True)
    assert result.model is target and count_batchnorms(target) == 0
