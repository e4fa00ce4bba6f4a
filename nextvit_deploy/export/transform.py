"""The precision transform of a deploy-form fp32 ONNX graph, as the exporters and ``bench`` call it.

:func:`apply_precision` reads the request's calibration images and rewrites a file;
:func:`transform_graph` is the in-memory transform both it and ``bench`` use. Conventions:
``"tensorrt"`` (FP16: mixed-precision graph; INT8: symmetric int8 Q/DQ on the inputs of
Conv/Gemm/MatMul, see :mod:`.int8`) and ``"onnxruntime"`` (FP16: the same mixed-precision graph;
INT8: the U8 activation / S8 weight QDQ graph ONNX Runtime accelerates on x86).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._deps import require
from ..errors import BadInput
from .precision import Convention, Feeds, calibration_set

if TYPE_CHECKING:  # pragma: no cover
    from . import ExportRequest
    from .int8 import Int8Options

__all__ = ["apply_precision", "transform_graph"]


def apply_precision(src: Path, dst: Path, req: ExportRequest, *, convention: Convention,
                    progress: Callable[[str], None]) -> dict[str, Any]:
    """Rewrite the fp32 ONNX at ``src`` into ``req.precision`` and save it at ``dst`` (may equal ``src``).

    Calibration images come from ``req.calib_dir`` (at most ``req.calib_images``), else from the
    bundled calibration photos; both FP16 (to pick the nodes kept in FP32) and INT8 (to set scales) use them.

    Args:
        src: the deploy-form fp32 ONNX.
        dst: where to write the transformed graph (not atomically: callers pass a temp path).
        req: the export request (precision, image size, calibration options, input kind).
        convention: ``"tensorrt"`` or ``"onnxruntime"`` (only INT8 differs, see the module docstring).
        progress: callback for one-line progress messages.

    Returns:
        The manifest ``details`` of the transform: calibration source, the FP32-kept nodes and why
        (FP16), the quantized tensors and scales summary (INT8), and the graph's operator counts.
    """
    onnx = require("onnx", purpose="precision transforms")
    if req.precision == "fp32":
        if Path(src) != Path(dst):
            onnx.save(onnx.load(str(src)), str(dst))
        return {"precision": "fp32", "transform": "none"}
    if req.precision not in ("fp16", "int8"):
        raise BadInput(f"precision {req.precision} has no graph transform: choose fp32, fp16 or int8")
    if convention not in ("tensorrt", "onnxruntime"):
        raise BadInput(f"unknown precision convention {convention!r}: use 'tensorrt' or 'onnxruntime'")
    from nextvit_model import resolve_variant

    cfg = resolve_variant(req.variant)
    progress(f"loading calibration images ({req.calib_dir or 'bundled calibration photos'})")
    calib = calibration_set(image_size=req.image_size, calib_dir=req.calib_dir, calib_images=req.calib_images,
                            crop_pct=cfg.crop_pct, mean=cfg.mean, std=cfg.std, input_kind=req.input_kind)
    out_model, details = transform_graph(onnx.load(str(src)), req.precision, calib.feeds, convention=convention,
                                         int8=req.int8_options(), weight_bits=req.int8_weight_bits,
                                         progress=progress)
    onnx.save(out_model, str(dst))
    onnx.checker.check_model(str(dst))
    details.update({"precision": req.precision, "convention": convention, "calibration": calib.describe()})
    return details


def transform_graph(model, precision: str, calibration: Feeds, *, convention: Convention,
                    int8: Int8Options | None = None, weight_bits: int | None = None,
                    progress: Callable[[str], None] = lambda _m: None) -> tuple[Any, dict[str, Any]]:
    """The precision transform itself, on an in-memory fp32 graph: what ``export`` and ``bench`` share.

    Args:
        model: fp32 ``onnx.ModelProto``.
        precision: "fp16" or "int8".
        calibration: float32 NCHW inputs in the model's input convention.
        convention: "tensorrt" or "onnxruntime" (INT8 only).
        int8: TensorRT-convention INT8 options. Defaults to :class:`~.int8.Int8Options` ().
        weight_bits: ONNX Runtime x86 INT8 weight range: 8 (CPUs with VNNI/AMX accumulate u8 x s8 in int32)
            or 7 (without, ``vpmaddubsw`` would saturate int16 pairs). Defaults to None: what this CPU has
            (:func:`nextvit_deploy.cpuinfo.int8_weight_bits`). The details record the bits and their source.
        progress: one-line progress callback.

    Returns:
        (transformed model, the manifest details of the transform).
    """
    if precision == "fp16":
        from .fp16 import to_mixed_fp16

        result = to_mixed_fp16(model, calibration, progress=progress)
        for keep in result.kept_fp32:
            progress(f"fp32 kept: {keep.node} ({keep.op_type}): {keep.reason}")
        return result.model, result.details()
    if precision != "int8":
        raise BadInput(f"precision {precision} has no graph transform: choose fp16 or int8")
    from .int8 import Int8Options, quantize_ort_x86, quantize_trt

    if convention == "tensorrt":
        res = quantize_trt(model, calibration, options=int8 or Int8Options(), progress=progress)
        return res.model, res.details()
    from ..cpuinfo import cpu_flags, int8_weight_bits

    if weight_bits not in (None, 7, 8):
        raise BadInput(f"--int8-weight-bits must be 7 or 8, got {weight_bits}")
    bits = weight_bits or int8_weight_bits()
    source = "requested" if weight_bits else f"detected (CPU flags: {', '.join(cpu_flags()) or 'none'})"
    progress(f"int8 (onnxruntime x86): {bits}-bit weights, {source}")
    res = quantize_ort_x86(model, calibration, reduce_range=bits == 7, progress=progress)
    details = res.details()
    details["weight_bits"] = {"bits": bits, "source": source}
    return res.model, details
