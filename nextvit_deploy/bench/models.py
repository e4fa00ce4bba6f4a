"""Which models a bench run times and how each becomes its deploy form (and its ONNX graph)."""
from __future__ import annotations

import contextlib
import difflib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import published
from .._deps import available, require
from ..errors import BadInput
from .types import BenchConfig

__all__ = ["resolve_models", "build_bench_model", "export_bench_onnx", "trt_ready_onnx", "transformed_onnx", "largest_gemms",
           "is_nextvit"]


def is_nextvit(name: str) -> bool:
    return name.startswith("nextvit_")


def resolve_models(cfg: BenchConfig) -> list[str]:
    """The timm names to run, validated (one-line errors that name the fix)."""
    task, side = cfg.published_task, cfg.size[0]
    rows = published.rows_for(task, side) if cfg.size[0] == cfg.size[1] else []
    if cfg.models:
        names = []
        known = {r.timm_name for r in published.published_rows() if r.timm_name}
        by_display = {r.model.lower(): r for r in published.published_rows()}
        for raw in cfg.models:
            key = raw.strip()
            if not key:
                continue
            row = by_display.get(key.lower())
            if row is not None and not row.timm_name:
                raise BadInput(f"{row.model} is not in timm ({row.note}): pick another model or drop it from --models")
            name: str = row.timm_name if row is not None and row.timm_name else key
            if name in ("s", "b", "l", "small", "base", "large"):
                from nextvit_model import resolve_variant

                name = resolve_variant(name).name
            if name not in known and not is_nextvit(name):
                if available("timm"):
                    import timm

                    if timm.is_model(name):
                        names.append(name)
                        continue
                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise BadInput(f"unknown model {raw!r}{hint}: use a timm name from the published table, "
                               f"e.g. {', '.join(published.DEFAULT_MODELS['cls'])}")
            if is_nextvit(name) and name not in ("nextvit_small", "nextvit_base", "nextvit_large"):
                raise BadInput(f"unknown Next-ViT variant {raw!r}: use nextvit_small, nextvit_base or nextvit_large")
            if name not in names:
                names.append(name)
        if not names:
            raise BadInput("--models is empty: name at least one model, e.g. --models nextvit_small,resnet101")
        return names
    if cfg.full:
        names = list(dict.fromkeys(r.timm_name for r in rows if r.timm_name))
        if not names:
            raise BadInput(f"no published {task} rows at {cfg.size[0]}x{cfg.size[1]}: use --image-size "
                           f"{published.TASK_ROWS[cfg.task][1]} with --full, or name --models")
        return names
    return list(published.DEFAULT_MODELS[cfg.task])


@dataclass
class _Built:
    module: Any  # torch module in eval mode (deploy form where possible)
    export_module: Any  # what goes to ONNX
    output_names: tuple[str, ...]
    notes: list[str] = field(default_factory=list)


def _fold_conv_bn(model, notes: list[str]):
    """Fold Conv->BN pairs of a timm model with torch.fx; keep the model as it is when tracing fails."""
    from torch import nn

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    try:
        from torch.fx.experimental.optimization import fuse

        fused = fuse(model)
    except Exception as exc:  # fx cannot trace every timm model: fall back to the unfused eval model
        notes.append(f"torch rows: BatchNorms not folded (torch.fx: {type(exc).__name__})")
        return model
    before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    notes.append(f"torch rows: {before - left} Conv->BN pairs folded by torch.fx")
    if left:
        notes.append(f"torch rows: {left} BatchNorms without a preceding conv stay")
    return fused.eval()


def build_bench_model(name: str, *, task: str, image_size: tuple[int, int]) -> _Built:
    """The deploy form of ``name`` for ``task`` (``cls``: logits; ``det``: backbone feature maps)."""
    import torch

    if is_nextvit(name):
        from nextvit_model import create_model

        from ..fuse import fuse_model

        with torch.no_grad():
            model = create_model(name, features_only=task == "det")
            fused = fuse_model(model, inplace=True)
        names: tuple[str, ...] = ("feat_s4", "feat_s8", "feat_s16", "feat_s32") if task == "det" else ("logits",)
        notes = [f"{fused.folded} BatchNorms folded by fuse_model"]
        return _Built(fused.model.eval(), fused.model.eval(), names, notes)
    timm = require("timm", purpose=f"the {name} baseline of the latency table")
    notes = []
    if task == "det":
        try:
            model = timm.create_model(name, pretrained=False, features_only=True).eval()
        except Exception as exc:  # some timm models have no feature extraction: use the trunk without head
            notes.append(f"features_only unsupported ({type(exc).__name__}): trunk without pooling/head")
            model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="").eval()
        with torch.no_grad():
            out = model(torch.zeros(1, 3, *image_size))
        count = 1 if isinstance(out, torch.Tensor) else len(out)
        names = tuple(f"feat_{i}" for i in range(count))
    else:
        model = timm.create_model(name, pretrained=False).eval()
        names = ("logits",)
    torch_model = _fold_conv_bn(model, notes)
    return _Built(torch_model, model, names, notes)


# --------------------------------------------------------------------------------------------------
# Per-backend measurement.
def export_bench_onnx(built: _Built, cfg: BenchConfig, path: Path, *, simplify: bool, static: bool) -> list[str]:
    """ONNX of the deploy form; returns notes (BatchNorm nodes left, simplifier).

    ``static``: batch fixed at ``cfg.batch`` (what TensorRT gets, as in the paper). Otherwise the graph
    is traced at batch 1 with a dynamic batch axis, which costs an eighth of a batch-8 trace; ONNX
    Runtime on a CPU plans the same kernels either way.
    """
    import onnx

    from ..export.onnx import graph_facts, simplify_onnx, to_onnx

    trace_batch = cfg.batch if static else 1
    to_onnx(built.export_module, path, image_size=cfg.size, batch=trace_batch, dynamic_batch=not static,
            opset=cfg.opset, output_names=built.output_names)
    proto = onnx.load(str(path))
    notes = []
    if simplify:
        rng = np.random.default_rng(0)
        feed = rng.standard_normal((trace_batch, 3, *cfg.size), dtype=np.float32)
        proto, tool, simp_notes = simplify_onnx(proto, check_feeds=[feed])
        onnx.save(proto, str(path))
        notes.append(f"simplifier: {tool}")
        notes.extend(simp_notes)
    facts = graph_facts(proto)
    if facts["batchnorm_nodes"]:
        notes.append(f"onnx: {facts['batchnorm_nodes']} BatchNormalization nodes left")
    return notes


TRT_CALIBRATION_IMAGES = 16  # fp16 rows: images that measure activation ranges (the export default is 64)


def transformed_onnx(onnx_path: Path, precision: str, cfg: BenchConfig, out: Path, *,
                     convention: str) -> tuple[Path, list[str]]:
    """The bench ONNX in ``precision`` through ``export``'s precision transform (``transform_graph``), in the
    backend's ``convention`` (``"onnxruntime"``: U8S8 QDQ, weight bits from this CPU; ``"tensorrt"``),
    calibrated on the bundled calibration photos (never the images verify or the accuracy benchmark use).
    Returns (the graph, notes on the transform: weight bits and their source, fp32 keep-list size)."""
    if precision == "fp32":
        return onnx_path, []
    import onnx

    from nextvit_model import IMAGENET_MEAN, IMAGENET_STD

    from ..data import calibration_photos, normalize
    from ..export.transform import transform_graph

    calib = normalize(calibration_photos(TRT_CALIBRATION_IMAGES, cfg.size), IMAGENET_MEAN, IMAGENET_STD)
    with contextlib.redirect_stdout(io.StringIO()):  # ONNX Runtime's calibrator prints its steps to stdout
        model, details = transform_graph(onnx.load(str(onnx_path)), precision, calib,
                                         convention=convention)  # type: ignore[arg-type]
    onnx.save(model, str(out))
    notes = [f"{precision} ({convention} convention): calibrated on {TRT_CALIBRATION_IMAGES} bundled calibration photos"]
    bits = details.get("weight_bits") if isinstance(details, dict) else None
    if isinstance(bits, dict) and "bits" in bits:
        notes.append(f"{precision} ({convention}): {bits['bits']}-bit weights, {bits.get('source', '')}".rstrip(", "))
    return out, notes


def trt_ready_onnx(onnx_path: Path, precision: str, cfg: BenchConfig, out: Path) -> Path:
    """The graph a TensorRT row builds, through the same precision transform as ``export --target trt``
    (a strongly typed build takes its precision from the graph): fp32 as exported, fp16/int8 the transformed
    graph calibrated on the bundled calibration photos."""
    return transformed_onnx(onnx_path, precision, cfg, out, convention="tensorrt")[0]


def largest_gemms(module: Any, image_size: tuple[int, int], batch: int, *, top: int = 2) -> list[tuple[int, int, int]]:
    """The ``top`` largest (M, K, N) GEMMs of ``module`` at ``batch``: every ``nn.Linear`` and 1x1 convolution
    (what a runtime lowers to a GEMM), found by forward hooks on one batch-1 pass, M scaled to ``batch``."""
    import torch
    from torch import nn

    shapes: set[tuple[int, int, int]] = set()

    def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        x = inputs[0]
        if isinstance(mod, nn.Linear):
            shapes.add((int(x.numel() // x.shape[-1]) * batch, mod.in_features, mod.out_features))
        elif output.dim() == 4 and isinstance(mod, nn.Conv2d):
            shapes.add((int(output.shape[2] * output.shape[3]) * batch, mod.in_channels // mod.groups,
                        mod.out_channels))

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1)]
    try:
        with torch.inference_mode():
            module(torch.zeros(1, 3, *image_size))
    finally:
        for h in handles:
            h.remove()
    return sorted(shapes, key=lambda s: -s[0] * s[1] * s[2])[:top]
