"""INT8 as a graph: explicit quantization with QuantizeLinear/DequantizeLinear (Q/DQ) nodes.

Two conventions, because the two runtimes accelerate different graphs:

* **TensorRT** (:func:`quantize_trt`, written here with ``onnx``): symmetric int8, zero point 0,
  per-channel weight scales (weights stored as int8 initializers behind a DequantizeLinear),
  per-tensor activation scales, and Q/DQ only on the inputs of Conv, Gemm and MatMul, where TensorRT
  fuses them into int8 kernels. TensorRT 11 builds such a graph strongly typed (no INT8 flag, no
  calibrator); :mod:`nextvit_deploy.trt_compat` checks these rules on every trt export.
* **ONNX Runtime x86** (:func:`quantize_ort_x86`, ONNX Runtime's ``quantize_static``): QDQ with uint8
  activations (asymmetric) and int8 per-channel weights, the U8S8 form ONNX Runtime's CPU kernels
  (QLinearConv / MatMulInteger via VPMADDUBSW) accelerate.

Both run on ONNX Runtime CPU, so both are verified and measured here.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np

from .._deps import require
from .precision import feed_chunks, measure_activations, static_batch

__all__ = ["QUANTIZED_OPS", "Int8Result", "weight_channel_axis", "quantize_trt", "quantize_ort_x86",
           "CalibrationMethod"]

QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
CalibrationMethod = Literal["max", "percentile"]
INT8_WEIGHT_MAX = 127  # symmetric: weights use [-127, 127]
INT8_ACT_MAX = 127  # scale = amax / 127; TensorRT clamps activations to [-128, 127]
MIN_AMAX = 1e-8  # an all-zero tensor still gets a positive scale


@dataclass(frozen=True)
class Int8Result:
    """A quantized graph and what the transform did (for the manifest and the CLI)."""

    model: Any  # onnx.ModelProto
    convention: str
    quantized_nodes: tuple[str, ...]
    activation_scales: int
    weight_tensors: int
    method: str
    notes: tuple[str, ...] = ()
    skipped: tuple[dict[str, str], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def details(self) -> dict[str, Any]:
        return {"transform": f"int8 Q/DQ ({self.convention} convention)", "calibration_method": self.method,
                "quantized_nodes": len(self.quantized_nodes), "activation_scales": self.activation_scales,
                "weight_tensors": self.weight_tensors, "skipped": list(self.skipped), "notes": list(self.notes),
                **self.extra}


def weight_channel_axis(node, weight_shape: Sequence[int]) -> Optional[int]:
    """Output-channel axis of the weight input (input 1) of a Conv/Gemm/MatMul, or None if not a weight.

    Conv ``W[O, I/g, kh, kw]`` -> 0; Gemm ``B[K, N]`` -> 1 (``transB=1``: ``B[N, K]`` -> 0);
    MatMul with a constant 2-D ``B[K, N]`` -> 1.
    """
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul" and len(weight_shape) == 2:
        return 1
    return None


def quantize_trt(model, calibration: np.ndarray, *, method: CalibrationMethod = "percentile",
                 percentile: float = 99.99, exclude_nodes: Sequence[str] = (),
                 progress: Optional[Callable[[str], None]] = None) -> Int8Result:
    """Insert TensorRT-convention Q/DQ on the inputs of every Conv/Gemm/MatMul of ``model``.

    Args:
        model: fp32 ``onnx.ModelProto``.
        calibration: float32 NCHW model inputs for the activation ranges.
        method: ``"percentile"`` (amax = the ``percentile``-th percentile of |x|, robust to outliers)
            or ``"max"`` (amax = max |x|). Defaults to "percentile".
        percentile: used by ``method="percentile"``. Defaults to 99.99.
        exclude_nodes: node names left unquantized.
        progress: one-line progress callback. Defaults to silent.

    Returns:
        :class:`Int8Result` with the Q/DQ model (weights stored as int8 + DequantizeLinear).
    """
    onnx = require("onnx")
    from onnx import helper, numpy_helper

    say = progress or (lambda _m: None)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i, node in enumerate(m.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    inits = {i.name: i for i in m.graph.initializer}
    const_outputs = {n.output[0] for n in m.graph.node if n.op_type == "Constant"}
    targets = [n for n in m.graph.node if n.op_type in QUANTIZED_OPS and n.name not in set(exclude_nodes)]
    acts = sorted({inp for n in targets for inp in n.input[:2] if inp and inp not in inits and inp not in const_outputs})
    say(f"int8: calibrating {len(acts)} activation tensors on {calibration.shape[0]} images ({method})")
    ranges = measure_activations(m, calibration, tensors=[a for a in acts if a not in
                                                          {vi.name for vi in m.graph.input}],
                                 percentile=percentile if method == "percentile" else None)
    if any(vi.name in acts for vi in m.graph.input):
        ranges.update(_input_ranges(m, calibration, percentile if method == "percentile" else None))
    new_inits = []
    act_dq: dict[str, str] = {}
    weight_dq: dict[str, str] = {}
    qdq_nodes = []
    skipped: list[dict[str, str]] = []
    quantized: list[str] = []
    zero_scalar = "qdq__zero_point_int8"
    new_inits.append(numpy_helper.from_array(np.array(0, dtype=np.int8), zero_scalar))

    def activation(name: str) -> str:
        if name not in act_dq:
            r = ranges[name]
            amax = max(r.percentile if method == "percentile" else r.absmax, MIN_AMAX)
            scale = f"{name}__act_scale"
            new_inits.append(numpy_helper.from_array(np.array(amax / INT8_ACT_MAX, dtype=np.float32), scale))
            q, dq = f"{name}__q", f"{name}__dq"
            qdq_nodes.append((name, helper.make_node("QuantizeLinear", [name, scale, zero_scalar], [q],
                                                     name=f"{name}__QuantizeLinear")))
            qdq_nodes.append((name, helper.make_node("DequantizeLinear", [q, scale, zero_scalar], [dq],
                                                     name=f"{name}__DequantizeLinear")))
            act_dq[name] = dq
        return act_dq[name]

    def weight(node, name: str) -> Optional[str]:
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        axis = weight_channel_axis(node, w.shape)
        if axis is None:
            return None
        if name not in weight_dq:
            reduce_axes = tuple(a for a in range(w.ndim) if a != axis)
            amax = np.maximum(np.abs(w).max(axis=reduce_axes), MIN_AMAX).astype(np.float32)
            scale = amax / INT8_WEIGHT_MAX
            shape = [1] * w.ndim
            shape[axis] = -1
            q = np.clip(np.round(w / scale.reshape(shape)), -INT8_WEIGHT_MAX, INT8_WEIGHT_MAX).astype(np.int8)
            qn, sn, zn, dq = f"{name}__int8", f"{name}__w_scale", f"{name}__w_zero_point", f"{name}__dq"
            new_inits.extend([numpy_helper.from_array(q, qn), numpy_helper.from_array(scale, sn),
                              numpy_helper.from_array(np.zeros(scale.shape, dtype=np.int8), zn)])
            qdq_nodes.append((None, helper.make_node("DequantizeLinear", [qn, sn, zn], [dq], axis=axis,
                                                     name=f"{name}__DequantizeLinear")))
            weight_dq[name] = dq
        return weight_dq[name]

    for node in targets:
        new_inputs = list(node.input)
        ok = True
        for idx in (0, 1):
            if idx >= len(node.input) or not node.input[idx]:
                continue
            name = node.input[idx]
            if name in inits:
                dq = weight(node, name) if idx == 1 else None
                if dq is None:
                    skipped.append({"node": node.name, "reason": f"input {idx} is a constant that is not a "
                                                                 "per-channel weight"})
                    ok = False
                    break
                new_inputs[idx] = dq
            elif name in const_outputs:
                skipped.append({"node": node.name, "reason": f"input {idx} is a Constant node"})
                ok = False
                break
            else:
                new_inputs[idx] = activation(name)
        if ok:
            for i, v in enumerate(new_inputs):
                node.input[i] = v
            quantized.append(node.name)
    # place each activation Q/DQ right after its producer (graph inputs: at the top); weights at the top
    producer_pos = {o: i for i, n in enumerate(m.graph.node) for o in n.output}
    head = [n for src, n in qdq_nodes if src is None or src not in producer_pos]
    after: dict[int, list] = {}
    for src, n in qdq_nodes:
        if src is not None and src in producer_pos:
            after.setdefault(producer_pos[src], []).append(n)
    ordered = list(head)
    for i, n in enumerate(m.graph.node):
        ordered.append(n)
        ordered.extend(after.get(i, []))
    del m.graph.node[:]
    m.graph.node.extend(ordered)
    used = {i for n in ordered for i in n.input}
    keep = [i for i in m.graph.initializer if i.name in used] + [i for i in new_inits if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    del m.graph.value_info[:]
    if m.opset_import[0].version < 13:  # per-axis DequantizeLinear needs opset 13
        raise ValueError("int8 Q/DQ needs opset >= 13: export with --opset 13 or higher")
    m = onnx.shape_inference.infer_shapes(m)
    onnx.checker.check_model(m)
    say(f"int8: {len(quantized)} Conv/Gemm/MatMul quantized, {len(skipped)} skipped")
    return Int8Result(model=m, convention="tensorrt", quantized_nodes=tuple(quantized),
                      activation_scales=len(act_dq), weight_tensors=len(weight_dq),
                      method=f"{method}" + (f" {percentile:g}" if method == "percentile" else ""),
                      skipped=tuple(skipped),
                      notes=("symmetric int8, zero point 0, per-channel weights, per-tensor activations, "
                             "Q/DQ on Conv/Gemm/MatMul inputs only",))


def _input_ranges(model, calibration: np.ndarray, percentile: Optional[float]):
    from .precision import TensorRange

    a = np.abs(calibration).ravel()
    amax = float(a.max())
    pct = float(np.percentile(a, percentile)) if percentile is not None else amax
    return {model.graph.input[0].name: TensorRange(absmax=amax, percentile=pct, tiny_fraction=0.0)}


class _Reader:
    """ONNX Runtime CalibrationDataReader over a float32 NCHW array, ``batch`` images at a time."""

    def __init__(self, input_name: str, data: np.ndarray, batch: int = 1, static: Optional[int] = None):
        self._items = [{input_name: chunk} for chunk in feed_chunks(data, batch, static=static)]
        self._it = iter(self._items)

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._items)


def quantize_ort_x86(model, calibration: np.ndarray, *, method: str = "Percentile", reduce_range: bool = True,
                     op_types: Sequence[str] = QUANTIZED_OPS, progress: Optional[Callable[[str], None]] = None) -> Int8Result:
    """ONNX Runtime's x86 convention: QDQ, uint8 activations, int8 per-channel weights (``quantize_static``).

    Args:
        model: fp32 ``onnx.ModelProto`` (batch dimension may be dynamic).
        calibration: float32 NCHW model inputs.
        method: ONNX Runtime ``CalibrationMethod`` name: "MinMax", "Percentile" or "Entropy".
            Defaults to "Percentile".
        reduce_range: 7-bit weights. Defaults to True: without AVX-512 VNNI, ONNX Runtime's U8S8 kernels
            (VPMADDUBSW) saturate int16 sums with 8-bit weights; measured on Next-ViT (depths 1,1,5,1):
            min cosine vs fp32 0.86 with 8-bit weights, 0.975 with 7-bit.
        op_types: operators to quantize. Defaults to Conv, Gemm, MatMul (the compute-bound ones).
        progress: one-line progress callback. Defaults to silent.
    """
    onnx = require("onnx")
    q = require("onnxruntime.quantization", purpose="ONNX Runtime int8 quantization")
    say = progress or (lambda _m: None)
    say(f"int8 (onnxruntime x86): quantize_static U8S8 QDQ, {method} calibration on {calibration.shape[0]} images")
    import logging

    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static logs a pre-processing hint at WARNING
    with tempfile.TemporaryDirectory(prefix="nextvit-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, str(src))
        q.quantize_static(
            str(src), str(dst), _Reader(model.graph.input[0].name, calibration, static=static_batch(model)),
            quant_format=q.QuantFormat.QDQ, activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
            per_channel=True, reduce_range=reduce_range, calibrate_method=getattr(q.CalibrationMethod, method),
            op_types_to_quantize=list(op_types),
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        out = onnx.load(str(dst))
    logging.getLogger().setLevel(quiet)
    n_q = sum(n.op_type == "QuantizeLinear" for n in out.graph.node)
    quantized = tuple(n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS)
    return Int8Result(model=out, convention="onnxruntime", quantized_nodes=quantized, activation_scales=n_q,
                      weight_tensors=sum(n.op_type == "DequantizeLinear" and n.input[0] in
                                         {i.name for i in out.graph.initializer} for n in out.graph.node),
                      method=method, notes=("uint8 activations (asymmetric), int8 per-channel weights, QDQ; "
                                            "ONNX Runtime fuses it into QLinear*/MatMulInteger kernels on x86",
                                            f"reduce_range={reduce_range}"))
