"""Reference PyTorch Next-ViT, installed as ``nextvit_model`` (the repository folder is ``model/``).

The only entry point is :func:`create_model`.
"""
from __future__ import annotations

from pathlib import Path

from .checkpoint import CheckpointError, LoadedCheckpoint, load_into, read_checkpoint, remap_state_dict
from .nextvit import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VARIANTS,
    InputSizeError,
    NextViT,
    UnknownVariantError,
    VariantCfg,
    check_input_size,
    min_input_size,
    resolve_variant,
    stage_resolutions,
)

__all__ = [
    "create_model",
    "NextViT",
    "VariantCfg",
    "VARIANTS",
    "resolve_variant",
    "stage_resolutions",
    "check_input_size",
    "min_input_size",
    "InputSizeError",
    "UnknownVariantError",
    "CheckpointError",
    "LoadedCheckpoint",
    "read_checkpoint",
    "remap_state_dict",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]


def create_model(
    variant: str = "nextvit_small",
    *,
    checkpoint: str | Path | LoadedCheckpoint | None = None,
    num_classes: int | None = None,
    features_only: bool = False,
    out_norms: bool | None = None,
    depths: tuple[int, int, int, int] | None = None,
) -> NextViT:
    """Build a Next-ViT in eval mode, optionally loading a checkpoint of any known layout.

    Args:
        variant: ``nextvit_small|base|large`` or an alias (``s``, ``b``, ``l``).
        checkpoint: path to an official, detection/segmentation or timm checkpoint (or one already read
            with :func:`read_checkpoint`). Defaults to none
            (random weights).
        num_classes: classifier width. Defaults to the checkpoint's, else 1000.
        features_only: backbone mode, returning the four stage feature maps.
        out_norms: in backbone mode, normalise each stage output (official detection backbones).
            Defaults to whether the checkpoint has such norms.
        depths: override the variant's depths (small test models). Defaults to the variant's.
    """
    cfg = resolve_variant(variant)
    if isinstance(checkpoint, LoadedCheckpoint):  # already read (an export reads its checkpoint once)
        ckpt: LoadedCheckpoint | None = checkpoint
    else:
        ckpt = read_checkpoint(checkpoint) if checkpoint is not None else None
    if ckpt is not None and num_classes is None:
        num_classes = ckpt.num_classes
    if out_norms is None:
        out_norms = bool(ckpt and ckpt.has_out_norms)
    model = NextViT(depths or cfg.depths, num_classes=num_classes or 1000, stem_chs=cfg.stem_chs,
                    sr_ratios=cfg.sr_ratios, head_dim=cfg.head_dim, mix_block_ratio=cfg.mix_block_ratio,
                    features_only=features_only, out_norms=features_only and out_norms)
    if ckpt is not None:
        source = "checkpoint" if isinstance(checkpoint, LoadedCheckpoint) else f"checkpoint {checkpoint}"
        load_into(model, ckpt, variant=cfg.name, source=source)
    return model.eval()
