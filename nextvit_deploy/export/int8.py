"""INT8 as a graph: explicit quantization with QuantizeLinear/DequantizeLinear (Q/DQ) nodes.

Two conventions, because the two runtimes accelerate different graphs:

* **TensorRT** (:func:`quantize_trt`, written here with ``onnx``), placed the way NVIDIA's Model
  Optimizer (ModelOpt) places Q/DQ for TensorRT:

  - symmetric int8, zero point 0; weights per output channel (stored as int8 initializers behind a
    DequantizeLinear), activations per tensor;
  - Q/DQ on the data inputs of Conv, Gemm and MatMul;
  - residual Adds: the input that is *not* the output of a Conv (the skip branch) gets Q/DQ too, so
    TensorRT can fuse Conv + Add (+ the next Quantize) into one int8 kernel (NVIDIA's quantization
    toolkit: "Q/DQ nodes need to be added to residual connections"; ModelOpt's
    ``build_non_residual_input_map``);
  - attention: the two activation-by-activation MatMuls of a MatMul -> Softmax -> MatMul pattern stay
    in high precision by default (ModelOpt's default; ``Int8Options.attention=True`` quantizes them);
  - the regions between Q/DQ pairs run in **FP16** by default (ModelOpt's ``high_precision_dtype``):
    TensorRT's parser gives a DequantizeLinear the type of its *scale*, so with fp32 scales every
    unquantized layer of a strongly typed network would be FP32. FP16 scales need opset >= 19;
    network inputs and outputs stay float32, and the measured-overflow rules of :mod:`.fp16` decide
    which nodes stay FP32. ``Int8Options.high_precision="fp32"`` keeps those regions FP32.

  TensorRT 10 and 11 build such a graph strongly typed (no INT8/FP16 flag, no calibrator);
  :mod:`nextvit_deploy.trt_compat` checks the parser's rules on every trt export.
* **ONNX Runtime x86** (:func:`quantize_ort_x86`, ONNX Runtime's ``quantize_static``): QDQ with uint8
  activations (asymmetric) and int8 per-channel weights, the U8S8 form ONNX Runtime's CPU kernels
  (QLinearConv / MatMulInteger via VPMADDUBSW) accelerate. Besides Conv/Gemm/MatMul it quantizes
  Relu and Add (:data:`ORT_X86_OPS`): with Relu quantized, the producer's output takes the Relu's range
  and ONNX Runtime drops the Relu, instead of leaving a DequantizeLinear -> QuantizeLinear pair with two
  different scales where the Relu was (44 in Next-ViT-S, one per Relu); with Add quantized, residual Adds
  run as QLinearAdd instead of DequantizeLinear -> float Add -> QuantizeLinear. Around ``quantize_static``
  (:mod:`.qdq_passes`): shared weights/biases get one copy per reader first (one shared bias scale left
  Convs in float), and afterwards each AveragePool between Q/DQ becomes the equal int8 depthwise Conv
  (ONNX Runtime's QLinearAveragePool was 5 % of the INT8 graph's time, the depthwise QLinearConv ~0 %).
  :func:`.qdq_passes.audit` counts what is left in the graph ONNX Runtime runs.

Calibration (activation ``amax``, scale = amax / 127) reads the |x| histograms that
:func:`~.precision.measure_activations` collects: ``max`` (largest |x|), ``percentile`` (the 99.99th
percentile) or ``entropy`` (the threshold that minimises the KL divergence between the clipped and the
int8-quantized distribution, TensorRT's entropy calibrator's criterion).

Both conventions run on ONNX Runtime CPU, so both are verified and measured here.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._deps import require
from .precision import Feeds, TensorRange, feed_batches, feed_count, measure_activations, static_batch
from .qdq_passes import pools_as_convs, remove_identity_pairs, unshare_initializers
from .qdq_plan import (
    CALIBRATION_METHODS,
    QUANTIZED_OPS,
    CalibrationMethod,
    Int8Options,
    QdqPlan,
    QdqSite,
    attention_matmuls,
    plan_qdq,
    residual_inputs,
    weight_channel_axis,
)

__all__ = ["QUANTIZED_OPS", "CALIBRATION_METHODS", "Int8Options", "QdqSite", "QdqPlan", "Int8Result",
           "weight_channel_axis", "attention_matmuls", "residual_inputs", "plan_qdq", "calibrated_amax",
           "entropy_amax", "quantize_trt", "quantize_ort_x86", "CalibrationMethod", "FP16_SCALE_OPSET", "ORT_X86_OPS"]

# ONNX Runtime x86 convention: the compute ops, plus Relu (folded into its producer's quantization) and Add
# (QLinearAdd); Concat and Transpose/Reshape follow their quantized neighbours in ONNX Runtime's QDQ fusion
# without being listed. Softmax and the attention scale Mul stay float (quantized: no measurable gain).
ORT_X86_OPS = ("Conv", "Gemm", "MatMul", "Relu", "Add")
INT8_WEIGHT_MAX = 127  # symmetric: weights use [-127, 127]
INT8_ACT_MAX = 127  # scale = amax / 127; TensorRT clamps activations to [-128, 127]
MIN_AMAX = 1e-8  # an all-zero tensor still gets a positive scale
FP16_SCALE_OPSET = 19  # QuantizeLinear/DequantizeLinear-19 take float16 scales; 13 takes float only


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


def entropy_amax(histogram: np.ndarray, bin_width: float, *, levels: int = 128) -> float:
    """The clipping threshold that minimises KL(P || Q) (TensorRT's entropy calibration criterion).

    For each candidate threshold ``i`` bins, P is the histogram cut at ``i`` with everything above
    folded into its last bin, and Q is the cut histogram merged into ``levels`` groups (one per
    positive int8 level) and spread back evenly over the bins that were non-zero. The search runs
    over every ``i`` from ``levels`` up to the last non-zero bin, coarsely first (every 16 bins), then
    bin by bin around the best coarse candidate.

    Args:
        histogram: counts of |x| in equal bins starting at 0.
        bin_width: width of one bin.
        levels: quantization levels of the positive half (int8: 128).

    Returns:
        amax (>= one bin; the full range when the histogram has fewer than ``levels`` occupied bins).
    """
    hist = np.asarray(histogram, dtype=np.float64).copy()
    if hist.size > 1:
        # the first bin holds the exact zeros of a ReLU output (half of all values); left as it is, it
        # dominates both distributions and the search clips the informative tail far too hard
        hist[0] = hist[1]
    nz = np.nonzero(hist)[0]
    if nz.size == 0:
        return float(bin_width)
    last = int(nz[-1]) + 1
    if last <= levels:
        return float(last * bin_width)
    suffix = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])

    def kl(i: int) -> float:
        p = hist[:i].copy()
        p[i - 1] += suffix[i]
        group = (np.arange(i) * levels) // i
        occupied = hist[:i] > 0
        g_sum = np.bincount(group, weights=hist[:i], minlength=levels)
        g_cnt = np.bincount(group, weights=occupied.astype(np.float64), minlength=levels)
        q = np.where(occupied, g_sum[group] / np.maximum(g_cnt[group], 1.0), 0.0)
        mask = p > 0
        p_n = p / p.sum()
        q_n = q / max(q.sum(), 1e-300)
        # a bin with P > 0 but Q == 0 (only the folded outlier bin can be) is smoothed, not infinite
        q_m = np.maximum(q_n[mask], 1e-12)
        return float(np.sum(p_n[mask] * np.log(p_n[mask] / q_m)))

    coarse = list(range(levels, last + 1, 16)) + [last]
    best = min(coarse, key=kl)
    fine = range(max(levels, best - 16), min(last, best + 16) + 1)
    best = min(fine, key=kl)
    return float(best * bin_width)


def calibrated_amax(r: TensorRange, options: Int8Options) -> float:
    """amax of one activation tensor under ``options.method`` (its histogram must have been collected)."""
    if options.method == "max" or r.histogram is None:
        amax = r.absmax
    elif options.method == "percentile":
        amax = r.quantile(options.percentile)
    else:
        amax = entropy_amax(r.histogram, r.bin_width)
    return max(min(amax, r.absmax) if r.absmax > 0 else amax, MIN_AMAX)


def quantize_trt(model, calibration: Feeds, *, options: Int8Options = Int8Options(),
                 progress: Callable[[str], None] | None = None) -> Int8Result:
    """The TensorRT-convention Q/DQ graph of the fp32 ``model`` (see the module docstring).

    Args:
        model: fp32 ``onnx.ModelProto``; opset >= 13, and >= 19 for ``high_precision="fp16"``.
        calibration: float32 NCHW model inputs for the activation ranges.
        options: :class:`Int8Options`. Defaults to max calibration, residual Q/DQ, attention in
            high precision, FP16 regions.
        progress: one-line progress callback. Defaults to silent.

    Returns:
        :class:`Int8Result` with the Q/DQ model (weights stored as int8 + DequantizeLinear).

    Raises:
        ValueError: the opset is too old for the requested form (the message names ``--opset``).
    """
    onnx = require("onnx")
    from onnx import helper, numpy_helper

    say = progress or (lambda _m: None)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise ValueError("int8 Q/DQ needs opset >= 13 (per-axis DequantizeLinear): export with --opset 13 or higher")
    if options.high_precision == "fp16" and opset < FP16_SCALE_OPSET:
        raise ValueError(f"int8 with fp16 regions needs opset >= {FP16_SCALE_OPSET} (fp16 Q/DQ scales), the graph "
                         f"has {opset}: export with --opset {FP16_SCALE_OPSET} or keep fp32 regions")
    if options.method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {options.method!r}: choose {', '.join(CALIBRATION_METHODS)}")
    named = model_with_names(model)  # stays fp32: the fp16 keep decision reads it below
    m = onnx.ModelProto()
    m.CopyFrom(named)
    plan = plan_qdq(m, options)
    acts = plan.activations
    say(f"int8: calibrating {len(acts)} activation tensors on {feed_count(calibration)} images ({options.describe()})")
    ranges = measure_activations(m, calibration, tensors=None if options.high_precision == "fp16" else acts,
                                 histograms=acts)
    inits = {i.name: i for i in m.graph.initializer}
    new_inits = [numpy_helper.from_array(np.array(0, dtype=np.int8), "qdq__zero_point_int8")]
    act_dq: dict[str, str] = {}
    weight_dq: dict[str, str] = {}
    amax_of: dict[str, float] = {}
    qdq_nodes: list[tuple[str | None, Any]] = []

    def activation(name: str) -> str:
        if name not in act_dq:
            amax = amax_of[name] = calibrated_amax(ranges[name], options)
            scale, q, dq = f"{name}__act_scale", f"{name}__q", f"{name}__dq"
            new_inits.append(numpy_helper.from_array(np.array(amax / INT8_ACT_MAX, dtype=np.float32), scale))
            qdq_nodes.append((name, helper.make_node("QuantizeLinear", [name, scale, "qdq__zero_point_int8"], [q],
                                                     name=f"{name}__QuantizeLinear")))
            qdq_nodes.append((name, helper.make_node("DequantizeLinear", [q, scale, "qdq__zero_point_int8"], [dq],
                                                     name=f"{name}__DequantizeLinear")))
            act_dq[name] = dq
        return act_dq[name]

    def weight(node, name: str) -> str:
        if name not in weight_dq:
            w = numpy_helper.to_array(inits[name]).astype(np.float32)
            axis = weight_channel_axis(node, w.shape)
            assert axis is not None, f"{node.name}: input {name} is not a weight"
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

    by_name = {n.name: n for n in m.graph.node}
    for site in plan.sites:
        node = by_name[site.node]
        node.input[site.input] = weight(node, site.tensor) if site.kind == "weight" else activation(site.tensor)
    # each activation Q/DQ right after its producer (graph inputs: at the top); weight DQs at the top
    producer_pos = {o: i for i, n in enumerate(m.graph.node) for o in n.output}
    ordered = [n for src, n in qdq_nodes if src is None or src not in producer_pos]
    after: dict[int, list] = {}
    for src, n in qdq_nodes:
        if src is not None and src in producer_pos:
            after.setdefault(producer_pos[src], []).append(n)
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
    m = onnx.shape_inference.infer_shapes(m)
    onnx.checker.check_model(m)
    extra: dict[str, Any] = {"qdq_sites": plan.counts(), "residual_qdq": sum(s.kind == "residual" for s in plan.sites),
                             "attention_quantized": options.attention, "high_precision": options.high_precision,
                             "opset": opset}
    notes = ["symmetric int8, zero point 0, per-channel weights, per-tensor activations (TensorRT convention)",
             "Q/DQ on Conv/Gemm/MatMul inputs" + (" and on the skip input of residual Conv + Add"
                                                   if options.residual else ""),
             "attention MatMul -> Softmax -> MatMul " + ("quantized" if options.attention else "in high precision")]
    if options.high_precision == "fp16":
        from .fp16 import choose_fp32_nodes, convert_to_mixed

        kept = choose_fp32_nodes(named, ranges)
        m, counts = convert_to_mixed(m, {k.node for k in kept})
        tiny = sum(1 for i in m.graph.initializer if i.name.endswith("_scale__fp16")
                   and np.any(np.abs(numpy_helper.to_array(i).astype(np.float32)) < 2.0 ** -14))
        extra.update({"fp32_kept": [k.to_dict() for k in kept], "fp32_kept_count": len(kept),
                      "casts_inserted": counts["casts"], "fp16_scales_subnormal": tiny, "scale_dtype": "float16"})
        notes.append(f"unquantized regions in FP16 (fp16 Q/DQ scales, opset {opset}); network I/O float32; "
                     f"{len(kept)} node(s) kept in FP32 by measured range")
    else:
        extra["scale_dtype"] = "float32"
        notes.append("unquantized regions in FP32 (fp32 Q/DQ scales)")
    extra["qdq_counts"] = {op: sum(n.op_type == op for n in m.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    extra["activation_amax"] = {"min": float(min(amax_of.values(), default=0.0)),
                                "max": float(max(amax_of.values(), default=0.0))}
    quantized = tuple(dict.fromkeys(s.node for s in plan.sites))
    say(f"int8: {len(quantized)} nodes quantized ({extra['residual_qdq']} residual Adds), "
        f"{len(plan.skipped)} left in {options.high_precision}")
    return Int8Result(model=m, convention="tensorrt", quantized_nodes=quantized, activation_scales=len(act_dq),
                      weight_tensors=len(weight_dq), method=options.describe(), skipped=plan.skipped,
                      notes=tuple(notes), extra=extra)


def model_with_names(model):
    """A copy of ``model`` whose nodes all have unique names (the names the Q/DQ graph uses)."""
    from .fp16 import _name_nodes  # the same names the fp16 transform gives (it runs on this graph after)

    onnx = require("onnx")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    _name_nodes(m)
    return m


class _Reader:
    """ONNX Runtime CalibrationDataReader over calibration feeds, ``batch`` images at a time (a fresh pass
    after each ``rewind``, so a streamed folder is never held in memory)."""

    def __init__(self, input_name: str, data: Feeds, batch: int = 1, static: int | None = None):
        self._name, self._data, self._batch, self._static = input_name, data, batch, static
        self.rewind()

    def get_next(self):
        chunk = next(self._it, None)
        return None if chunk is None else {self._name: chunk}

    def rewind(self) -> None:
        self._it = feed_batches(self._data, self._batch, static=self._static)


def quantize_ort_x86(model, calibration: Feeds, *, method: str = "Percentile", reduce_range: bool = True,
                     op_types: Sequence[str] = ORT_X86_OPS, progress: Callable[[str], None] | None = None) -> Int8Result:
    """ONNX Runtime's x86 convention: QDQ, uint8 activations, int8 per-channel weights (``quantize_static``).

    Args:
        model: fp32 ``onnx.ModelProto`` (batch dimension may be dynamic).
        calibration: float32 NCHW model inputs.
        method: ONNX Runtime ``CalibrationMethod`` name: "MinMax", "Percentile" or "Entropy".
            Defaults to "Percentile".
        reduce_range: 7-bit weights. Defaults to True: without AVX-512 VNNI, ONNX Runtime's U8S8 kernels
            (VPMADDUBSW) saturate int16 sums with 8-bit weights; measured on Next-ViT (depths 1,1,5,1):
            min cosine vs fp32 0.86 with 8-bit weights, 0.975 with 7-bit.
        op_types: operators to quantize. Defaults to :data:`ORT_X86_OPS` (Conv, Gemm, MatMul, Relu, Add);
            Conv, Gemm, MatMul alone leave one DequantizeLinear -> QuantizeLinear pair per Relu and float
            residual Adds (Next-ViT-S on a VNNI CPU, 2 threads, interleaved: b1 2.0x -> 2.4x FP32 with
            Relu/Add and the pool rewrite, b8 1.9x -> 2.6x; ``benchmarks/int8_speed.py --compare-ops``).
        progress: one-line progress callback. Defaults to silent.
    """
    onnx = require("onnx")
    q = require("onnxruntime.quantization", purpose="ONNX Runtime int8 quantization")
    say = progress or (lambda _m: None)
    say(f"int8 (onnxruntime x86): quantize_static U8S8 QDQ, {method} calibration on {feed_count(calibration)} images")
    import logging

    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static logs a pre-processing hint at WARNING
    with tempfile.TemporaryDirectory(prefix="nextvit-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        model, unshared = unshare_initializers(model, op_types)
        onnx.save(model, str(src))
        q.quantize_static(
            str(src), str(dst), _Reader(model.graph.input[0].name, calibration, static=static_batch(model)),
            quant_format=q.QuantFormat.QDQ, activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
            per_channel=True, reduce_range=reduce_range, calibrate_method=getattr(q.CalibrationMethod, method),
            op_types_to_quantize=list(op_types),
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        out = onnx.load(str(dst))
    logging.getLogger().setLevel(quiet)
    out, identities = remove_identity_pairs(out)
    out, pools = pools_as_convs(out)
    n_q = sum(n.op_type == "QuantizeLinear" for n in out.graph.node)
    quantized = tuple(n.name for n in model.graph.node if n.op_type in op_types)
    return Int8Result(model=out, convention="onnxruntime", quantized_nodes=quantized, activation_scales=n_q,
                      weight_tensors=sum(n.op_type == "DequantizeLinear" and n.input[0] in
                                         {i.name for i in out.graph.initializer} for n in out.graph.node),
                      method=method, notes=("uint8 activations (asymmetric), int8 per-channel weights, QDQ; "
                                            "ONNX Runtime fuses it into QLinear*/MatMulInteger kernels on x86",
                                            f"reduce_range={reduce_range}", f"op types: {', '.join(op_types)}"),
                      extra={"op_types": list(op_types), "identity_dq_q_removed": identities,
                             "initializers_unshared": unshared, "pools_as_depthwise_convs": pools})
