"""Load Next-ViT checkpoints of every published layout, remapping keys by name and checking every shape.

Layouts recognised:
- ``timm``: ``stem.N.*``, ``stages.S.blocks.B.*``, ``norm.*``, ``head.fc.*`` (also this package's own).
- ``official``: the ByteDance classification release, ``stem.N.*``, ``features.K.*`` (blocks numbered
  across stages), ``mlp.conv1/conv2``, ``norm.*``, ``proj_head.0.*``; possibly nested under ``model`` or
  ``state_dict`` and possibly prefixed ``module.``.
- ``official-backbone``: the detection/segmentation releases, ``state_dict`` with ``backbone.``-prefixed
  official keys plus ``extra_norm_list.S.*`` (the per-stage output norms); other keys (neck, heads) are
  ignored.

Checkpoints are untrusted input: ``torch.load(..., weights_only=True)`` only, or ``.safetensors`` (no pickle).
"""
from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .nextvit import VARIANTS, NextViT, VariantCfg

__all__ = ["CheckpointError", "LoadedCheckpoint", "read_checkpoint", "remap_state_dict", "load_into", "MAX_CLASSES",
           "check_finite"]

MAX_CLASSES = 100_000  # a wider head is a corrupt or hostile file (an expanded tensor can claim 1e9 rows)

Layout = Literal["timm", "official", "official-backbone"]
_SHOW = 5  # how many offending keys an error lists


class CheckpointError(ValueError):
    """The checkpoint cannot be used: missing, corrupt, unsafe, of another variant or layout."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    state_dict: dict[str, torch.Tensor]  # already in this package's (timm) key layout
    layout: Layout
    variant: str | None  # the variant whose depths the keys describe, None when undecidable
    num_classes: int | None  # None for backbone checkpoints
    has_out_norms: bool


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file: tensors only by construction (no pickle), so nothing to refuse but corruption."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"checkpoint {path} is a .safetensors file but safetensors is not installed: "
                              "pip install safetensors") from None
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file ({type(exc).__name__}); "
                              "re-download it") from None


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors: an 8-byte little-endian header length, then the JSON header (torch files start PK or 0x80)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < path.stat().st_size


def _torch_load(path: Path) -> object:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path")
    if path.suffix == ".safetensors" or (not path.suffix and _looks_like_safetensors(path)):  # hub blobs: no suffix
        return _safetensors_load(path)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses globals outside its allow-list (e.g. os.system in a __reduce__ payload)
        # and also fails on bytes that are not a pickle at all: tell the two apart by the message.
        blocked = re.search(r"(GLOBAL [\w.]+|[Uu]nsupported global[^\n]*)", str(exc))
        if blocked:
            raise CheckpointError(
                f"checkpoint {path} was refused: it holds pickled objects other than tensors ({blocked.group(1)}); "
                "re-save only the weights with torch.save(model.state_dict(), path) from code you trust") from None
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a PyTorch file (unreadable pickle); "
            "re-download or re-save it with torch.save(state_dict, path)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a PyTorch file ({type(exc).__name__}); "
            "re-download or re-save it with torch.save(state_dict, path)") from None


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in ("state_dict", "model", "model_ema", "module"):
                if key in obj and isinstance(obj[key], Mapping):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"checkpoint {path} holds no state dict: expected a dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"checkpoint {path} holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _detect_layout(keys: list[str], path: Path) -> Layout:
    if any(k.startswith("backbone.features.") for k in keys):
        return "official-backbone"
    if any(k.startswith("features.") for k in keys):
        return "official"
    if any(k.startswith("stages.") for k in keys):
        return "timm"
    raise CheckpointError(
        f"checkpoint {path} has an unknown layout (first keys: {', '.join(keys[:_SHOW])}); expected Next-ViT keys "
        "such as features.N.* (official), backbone.features.N.* (detection/segmentation) or stages.N.* (timm)")


def _variant_for_total(total_blocks: int) -> VariantCfg | None:
    return next((c for c in VARIANTS.values() if sum(c.depths) == total_blocks), None)


def _official_to_timm(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    block_ids = {int(m.group(1)) for k in state if (m := re.match(r"features\.(\d+)\.", k))}
    total = max(block_ids) + 1
    cfg = _variant_for_total(total)
    if cfg is None:
        raise CheckpointError(
            f"checkpoint {path} has {total} blocks, which matches no Next-ViT variant "
            f"({', '.join(f'{c.name}: {sum(c.depths)}' for c in VARIANTS.values())})")
    position = []
    for stage, depth in enumerate(cfg.depths):
        position += [(stage, b) for b in range(depth)]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        if m := re.match(r"features\.(\d+)\.(.*)", key):
            stage, block = position[int(m.group(1))]
            rest = m.group(2).replace("mlp.conv1.", "mlp.fc1.").replace("mlp.conv2.", "mlp.fc2.")
            new = f"stages.{stage}.blocks.{block}.{rest}"
        elif key.startswith("proj_head.0."):
            new = "head.fc." + key[len("proj_head.0."):]
        elif m := re.match(r"extra_norm_list\.(\d+)\.(.*)", key):
            new = f"out_norms.{m.group(1)}.{m.group(2)}"
        out[new] = value
    return out, cfg.name


def remap_state_dict(state: dict[str, torch.Tensor], *, path: Path = Path("<state_dict>")) -> LoadedCheckpoint:
    """Bring a state dict of any known layout into this package's key layout (by name, never by position)."""
    layout = _detect_layout(list(state), path)
    if layout == "official-backbone":
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        # The released backbones normalise the last stage with ``norm`` when extra_norm_list has 3 entries.
        if "norm.weight" in state and not any(k.startswith("extra_norm_list.3.") for k in state):
            state = {(f"extra_norm_list.3.{k[5:]}" if k.startswith("norm.") else k): v for k, v in state.items()}
    if layout in ("official", "official-backbone"):
        mapped, variant = _official_to_timm(state, path)
    else:
        mapped = dict(state)
        depth3 = {int(m.group(1)) for k in mapped if (m := re.match(r"stages\.2\.blocks\.(\d+)\.", k))}
        cfg = next((c for c in VARIANTS.values() if depth3 and c.depths[2] == max(depth3) + 1), None)
        variant = cfg.name if cfg else None
    head = mapped.get("head.fc.weight")
    if head is not None and (head.dim() != 2 or not 1 <= head.shape[0] <= MAX_CLASSES):
        raise CheckpointError(f"checkpoint {path} has a classifier head of shape {tuple(head.shape)}; expected "
                              f"(classes, features) with 1 to {MAX_CLASSES} classes: the file is corrupt")
    return LoadedCheckpoint(
        state_dict=mapped, layout=layout, variant=variant,
        num_classes=int(head.shape[0]) if head is not None else None,
        has_out_norms=any(k.startswith("out_norms.") for k in mapped))


_FINITE_CHECK_MAX = 1 << 27  # larger tensors cannot be Next-ViT weights (load_into refuses their shape)


def check_finite(state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Refuse NaN/Inf weights, naming the first tensor that holds them."""
    for key, value in state.items():
        if value.is_floating_point() and value.numel() <= _FINITE_CHECK_MAX and not bool(torch.isfinite(value).all()):
            nan, inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
            raise CheckpointError(f"{source} has non-finite weights in {key} ({nan} NaN, {inf} Inf values): "
                                  "export refuses them; fix the checkpoint or re-train")


def read_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Load ``path`` safely (``weights_only=True``), remap it to this package's key layout and refuse
    NaN/Inf weights."""
    path = Path(path)
    ckpt = remap_state_dict(_unwrap(_torch_load(path), path), path=path)
    check_finite(ckpt.state_dict, source=f"checkpoint {path}")
    return ckpt


def load_into(model: NextViT, ckpt: LoadedCheckpoint, *, variant: str, source: str = "checkpoint") -> None:
    """Copy ``ckpt`` into ``model`` after checking that every key and every shape matches."""
    if ckpt.variant is not None and ckpt.variant != variant:
        short = ckpt.variant.split("_")[1]
        raise CheckpointError(
            f"{source} is a {ckpt.variant} checkpoint but {variant} was requested: pass --variant {short}")
    own = model.state_dict()
    incoming = dict(ckpt.state_dict)
    if model.head is None:  # a classification checkpoint feeding a backbone: drop the classifier parts
        incoming = {k: v for k, v in incoming.items() if not k.startswith(("head.", "norm."))}
    missing = sorted(set(own) - set(incoming))
    unexpected = sorted(set(incoming) - set(own))
    # BatchNorm counters are bookkeeping, not weights: tolerate their absence either way.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:_SHOW])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:_SHOW])})")
        fits = f"; the file fits {ckpt.variant}" if ckpt.variant else ""
        raise CheckpointError(f"{source} does not match {variant}: {'; '.join(parts)}{fits}")
    bad = [f"{k} {tuple(incoming[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
           if k in incoming and incoming[k].shape != v.shape]
    if bad:
        raise CheckpointError(
            f"{source} has {len(bad)} tensors of the wrong shape for {variant} (e.g. {'; '.join(bad[:3])})")
    check_finite({k: v for k, v in incoming.items() if k in own}, source=source)  # also for in-memory dicts
    model.load_state_dict({k: v for k, v in incoming.items() if k in own}, strict=False)
