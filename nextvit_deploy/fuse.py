"""The deploy form: every BatchNorm folded into a neighbouring linear operator.

Fusion belongs to the model: each block has an idempotent ``reparameterize()`` (see
``nextvit_model.nextvit``). This module walks a *copy* of the model and calls them, so the caller's
model is never mutated, and counts what was folded.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["FuseResult", "fuse_model", "count_batchnorms"]


@dataclass(frozen=True)
class FuseResult:
    model: nn.Module
    folded: int  # BatchNorm layers folded by this call (0 when the model was already fused)
    remaining: int  # BatchNorm layers left (0 for a fully fused Next-ViT)


def count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def fuse_model(model: nn.Module, *, inplace: bool = False) -> FuseResult:
    """Return the deploy form of ``model`` (a fused copy unless ``inplace``) in eval mode.

    Every module exposing ``reparameterize()`` is folded, innermost first; calling this on an already
    fused model folds nothing and returns an equal model.
    """
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    folded = 0
    # Snapshot the module list first: reparameterize() replaces submodules while we walk.
    for module in reversed(list(target.modules())):
        fn = getattr(module, "reparameterize", None)
        if callable(fn):
            folded += int(fn() or 0)
    return FuseResult(model=target, folded=folded, remaining=count_batchnorms(target))
