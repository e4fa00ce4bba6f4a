"""Build the PyTorch reference of an artifact from its manifest alone.

With a checkpoint, the reference loads it (after checking its sha256 against the manifest). Without
one, the weights are random but reproducible from a seed, and every BatchNorm gets realistic
statistics: random affine parameters and running statistics gathered from forward passes over real
photos. Identity BatchNorm (freshly initialised) would hide fusion bugs, so it is never used.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .artifact import Artifact, sha256_path
from .data import normalize, photos
from .errors import CheckpointMismatch

if TYPE_CHECKING:
    from nextvit_model import LoadedCheckpoint

__all__ = ["realistic_batchnorm_", "random_model", "reference_model", "build_model"]

CALIBRATION_PHOTOS = 12


@torch.no_grad()
def realistic_batchnorm_(model: nn.Module, *, seed: int, images: torch.Tensor) -> nn.Module:
    """Give every BatchNorm of ``model`` random affine parameters and running statistics measured on
    ``images`` (a normalised NCHW batch). Returns ``model`` in eval mode."""
    gen = torch.Generator().manual_seed(seed + 1)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.weight.copy_(torch.empty_like(bn.weight).uniform_(0.5, 1.5, generator=gen))
        bn.bias.copy_(torch.empty_like(bn.bias).normal_(0.0, 0.2, generator=gen))
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration passes
    model.train()
    for chunk in images.split(4):
        model(chunk)
    for bn in norms:
        bn.momentum = 0.1
    return model.eval()


def build_model(variant: str, *, checkpoint: str | Path | LoadedCheckpoint | None = None, seed: int | None = None,
                features_only: bool = False, depths: tuple[int, int, int, int] | None = None,
                num_classes: int | None = None) -> nn.Module:
    """The PyTorch Next-ViT an export starts from: a checkpoint's weights, or ``random_model(seed)``."""
    from nextvit_model import CheckpointError, create_model

    if checkpoint is not None:
        try:
            return create_model(variant, checkpoint=checkpoint, features_only=features_only,
                                num_classes=num_classes, depths=depths)
        except CheckpointError as exc:
            raise CheckpointMismatch(str(exc)) from None
    return random_model(variant, seed=0 if seed is None else seed, features_only=features_only,
                        depths=depths, num_classes=num_classes)


def random_model(variant: str, *, seed: int = 0, features_only: bool = False,
                 depths: tuple[int, int, int, int] | None = None,
                 num_classes: int | None = None, image_size: int = 224) -> nn.Module:
    """Random Next-ViT reproducible from ``seed``, with realistic BatchNorm statistics."""
    from nextvit_model import create_model, resolve_variant

    cfg = resolve_variant(variant)
    torch.manual_seed(seed)
    model = create_model(cfg.name, features_only=features_only, out_norms=features_only, depths=depths,
                         num_classes=num_classes)
    images = normalize(photos(CALIBRATION_PHOTOS, image_size, crop_pct=cfg.crop_pct), cfg.mean, cfg.std)
    return realistic_batchnorm_(model, seed=seed, images=torch.from_numpy(images))


def reference_model(artifact: Artifact) -> nn.Module:
    """Rebuild the unfused PyTorch model an artifact was exported from (eval mode)."""
    checkpoint = artifact.checkpoint
    if artifact.checkpoint_hub is not None:  # the same commit and file again (cache moved, another machine)
        from .hub import rebuild_path

        checkpoint = str(rebuild_path(artifact.checkpoint_hub, recorded=artifact.checkpoint,
                                      sha256=artifact.checkpoint_sha256, artifact=artifact.path.name))
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        if not ckpt.is_file():
            raise CheckpointMismatch(
                f"checkpoint {ckpt} named in the manifest of {artifact.path.name} is gone: restore it to verify")
        if artifact.checkpoint_sha256 and sha256_path(ckpt) != artifact.checkpoint_sha256:
            raise CheckpointMismatch(
                f"checkpoint {ckpt} changed since {artifact.path.name} was exported (sha256 differs): re-export")
    return build_model(artifact.variant, checkpoint=checkpoint, seed=artifact.seed,
                       features_only=artifact.features_only, depths=artifact.depths,
                       num_classes=artifact.num_classes)

