"""FP16 as a graph: a mixed-precision ONNX with float32 inputs and outputs.

TensorRT 11 has no FP16 builder flag: precision comes from the graph. This module writes that graph
itself with ``onnx`` (no onnxconverter-common / ModelOpt):

1. Measure every intermediate tensor of the fp32 graph on calibration images (ONNX Runtime CPU,
   :func:`~nextvit_deploy.export.precision.measure_activations`).
2. Choose the nodes that stay in FP32 from those measurements (:func:`choose_fp32_nodes`), each with
   the reason: a tensor that would overflow fp16 (|x| above ``FP16_MAX / margin``) keeps its producer
   and its consumers in FP32; a Softmax/Exp whose input is so large that fp16 rounding of the logits
   changes the probabilities noticeably; a tensor whose non-zero values are mostly below fp16's
   smallest normal number; a weight that overflows or flushes to zero in fp16.
3. Convert (:func:`convert_to_mixed`): FP16 nodes get fp16 copies of their float initializers and
   Cast nodes where an FP16 node reads an FP32 tensor or vice versa; graph inputs/outputs stay float32.

ONNX Runtime's CPU provider runs such a graph by computing unsupported fp16 kernels in fp32 between
casts, so CPU verification covers fp16 storage (weights and every activation rounded to fp16,
overflow to inf) but not fp16 accumulation inside a GPU kernel.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._deps import require
from .precision import (
    FP16_MAX,
    FP16_MIN_NORMAL,
    Feeds,
    TensorRange,
    feed_count,
    float_tensor_types,
    measure_activations,
)

__all__ = ["FP16_OPS", "Fp16Policy", "KeptNode", "Fp16Result", "activation_risk", "exp_input_risk", "weight_risk",
           "choose_fp32_nodes", "convert_to_mixed", "to_mixed_fp16"]

# Operators converted to fp16 (float inputs/outputs); everything else stays fp32 ("no fp16 policy").
FP16_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "Sigmoid",
    "Tanh", "Erf", "Gelu", "HardSigmoid", "HardSwish", "Clip", "Softmax", "AveragePool", "MaxPool",
    "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "Concat", "Reshape", "Transpose",
    "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Gather", "Identity", "Pad", "Resize", "Neg", "Abs",
})
# Operators that take any element type and produce non-float outputs: never cast their inputs.
TYPE_AGNOSTIC_OPS = frozenset({"Shape", "Size"})
# Float inputs that are not data (must keep their declared type): op -> input indices.
NON_DATA_INPUTS: dict[str, frozenset[int]] = {"Resize": frozenset({1, 2}), "Upsample": frozenset({1})}
# Ops whose output error is the input's *absolute* rounding error amplified (exp(x + e) = exp(x)(1 + e)).
EXP_LIKE_OPS = frozenset({"Softmax", "Exp", "LogSoftmax"})


@dataclass(frozen=True)
class Fp16Policy:
    """Thresholds of the FP32-keep decision (all magnitudes in the tensor's own units).

    Attributes:
        margin: a tensor stays fp32 when its calibration |x| max exceeds ``FP16_MAX / margin``; the
            margin covers inputs larger than the calibration images. Defaults to 4 (|x| > 16376).
        exp_input_max: Softmax/Exp inputs above this |x| stay fp32 (fp16 rounding error there is
            |x| * 2**-11, which becomes a relative error of the probabilities). Defaults to 64.
        tiny_fraction: a tensor stays fp32 when more than this fraction of its non-zero values is below
            fp16's smallest normal number (6.1e-5). Defaults to 0.05.
        weight_tiny_fraction: same for weights. Defaults to 0.05.
    """

    margin: float = 4.0
    exp_input_max: float = 64.0
    tiny_fraction: float = 0.05
    weight_tiny_fraction: float = 0.05

    @property
    def activation_max(self) -> float:
        return FP16_MAX / self.margin

    def to_dict(self) -> dict[str, float]:
        """The thresholds as the manifests record them (TensorRT/ONNX and Core ML alike)."""
        return {"activation_max": self.activation_max, "margin": self.margin, "exp_input_max": self.exp_input_max,
                "tiny_fraction": self.tiny_fraction}


@dataclass(frozen=True)
class KeptNode:
    """A node left in FP32 and why (shown by the CLI and stored in the manifest)."""

    node: str
    op_type: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"node": self.node, "op_type": self.op_type, "reason": self.reason}


@dataclass(frozen=True)
class Fp16Result:
    model: Any  # onnx.ModelProto
    kept_fp32: tuple[KeptNode, ...]
    fp16_nodes: int
    fp32_nodes: int
    casts: int
    policy: Fp16Policy
    ranges_summary: dict[str, Any] = field(default_factory=dict)

    def details(self) -> dict[str, Any]:
        return {"transform": "mixed-precision fp16 (float32 I/O)",
                "fp32_kept": [k.to_dict() for k in self.kept_fp32],
                "fp32_kept_count": len(self.kept_fp32), "fp16_nodes": self.fp16_nodes,
                "fp32_nodes": self.fp32_nodes, "casts_inserted": self.casts,
                "policy": self.policy.to_dict(), "ranges": self.ranges_summary}


def _fmt(x: float) -> str:
    return f"{x:.3g}"


# The keep decisions themselves, shared by the ONNX graph transform below and the Core ML guard
# (export/coreml_fp16.py): each returns the reason a tensor, a softmax-like input or a weight needs
# fp32, or None.
def activation_risk(name: str, r: TensorRange, policy: Fp16Policy) -> str | None:
    """Why an activation measured as ``r`` must not be stored in fp16 (overflow, underflow), or None."""
    if not np.isfinite(r.absmax):
        return f"tensor {name} is not finite in fp32 already"
    if r.absmax > policy.activation_max:
        return (f"overflow: |{name}| reaches {_fmt(r.absmax)} > {_fmt(policy.activation_max)} "
                f"(fp16 max 65504 / margin {policy.margin:g})")
    if r.tiny_fraction > policy.tiny_fraction:
        return (f"underflow: {r.tiny_fraction:.0%} of non-zero |{name}| below fp16's smallest normal "
                f"{FP16_MIN_NORMAL:.1e}")
    return None


def exp_input_risk(op_type: str, r: TensorRange, policy: Fp16Policy) -> str | None:
    """Why a Softmax/Exp-like op whose input measured ``r`` must compute in fp32, or None."""
    if r.absmax > policy.exp_input_max:
        return (f"precision: {op_type} input reaches |x| = {_fmt(r.absmax)} > {_fmt(policy.exp_input_max)}; "
                f"fp16 rounding (|x|*2^-11 = {_fmt(r.absmax / 2048)}) would shift the probabilities by that "
                "relative amount")
    return None


def weight_risk(name: str, weight: np.ndarray, policy: Fp16Policy) -> str | None:
    """Why a float weight must stay fp32 (overflows fp16, or mostly below its normal range), or None."""
    w = np.abs(np.asarray(weight, dtype=np.float32))
    if w.size and float(w.max()) > FP16_MAX:
        return f"weight {name} reaches {_fmt(float(w.max()))} > fp16 max 65504"
    nz = w[w > 0]
    frac = float((nz < FP16_MIN_NORMAL).mean()) if nz.size else 0.0
    if frac > policy.weight_tiny_fraction:
        return f"weight {name}: {frac:.0%} of non-zero values below fp16's smallest normal"
    return None


def choose_fp32_nodes(model, ranges: Mapping[str, TensorRange], *, policy: Fp16Policy = Fp16Policy(),
                      ) -> list[KeptNode]:
    """Pick the nodes that must stay in FP32 from measured activation ranges (and weights).

    Args:
        model: the fp32 ``onnx.ModelProto``.
        ranges: tensor name -> :class:`TensorRange` from :func:`measure_activations`.
        policy: thresholds. Defaults to :class:`Fp16Policy` ().

    Returns:
        One :class:`KeptNode` per node kept in FP32, in graph order, with the first reason found.
    """
    onnx = require("onnx")
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    reasons: dict[str, str] = {}

    def keep(node, why: str) -> None:
        reasons.setdefault(node.name, why)

    for node in model.graph.node:
        if node.op_type not in FP16_OPS and node.op_type not in TYPE_AGNOSTIC_OPS and node.op_type != "Constant":
            if any(inp in ranges or inp in inits for inp in node.input):
                keep(node, f"{node.op_type} has no fp16 policy here (kept as exported)")
    # activations: overflow, exp-like inputs, underflow
    for name, r in ranges.items():
        why = activation_risk(name, r, policy)
        if why:
            if name in producers:
                keep(producers[name], why)
            for c in consumers.get(name, []):
                if c.op_type not in TYPE_AGNOSTIC_OPS:
                    keep(c, why)
    for node in model.graph.node:
        if node.op_type in EXP_LIKE_OPS and node.input and node.input[0] in ranges:
            why = exp_input_risk(node.op_type, ranges[node.input[0]], policy)
            if why:
                keep(node, why)
    # weights
    for name, init in inits.items():
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        users = consumers.get(name, [])
        if users and all(u.op_type in ("Conv", "Gemm") and list(u.input).index(name) == 2 for u in users):
            continue  # a bias is added to an accumulator far larger than fp16's subnormal range
        why = weight_risk(name, numpy_helper.to_array(init), policy)
        if why:
            for c in consumers.get(name, []):
                keep(c, why)
    return [KeptNode(n.name, n.op_type, reasons[n.name]) for n in model.graph.node if n.name in reasons]


def _name_nodes(model) -> None:
    """Give every unnamed node a unique name (the FP32-keep list refers to nodes by name)."""
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _fold_constants_to_initializers(model) -> None:
    """Turn ``Constant`` nodes holding a tensor into initializers (so they convert like weights)."""
    keep = []
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = type(node.attribute[0].t)()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            model.graph.initializer.append(t)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _half_nodes(model, keep_fp32: set[str], *, qdq: bool) -> dict[str, bool]:
    """Which nodes compute in fp16: FP16_OPS not kept in fp32; with ``qdq``, a DequantizeLinear when every
    consumer is fp16, a QuantizeLinear when every DequantizeLinear it feeds is."""
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    half = {n.name: n.op_type in FP16_OPS and n.name not in keep_fp32 for n in model.graph.node}
    if qdq:
        for op in ("DequantizeLinear", "QuantizeLinear"):
            for n in model.graph.node:
                if n.op_type == op:
                    users = consumers.get(n.output[0], [])
                    half[n.name] = bool(users) and all(half[u.name] for u in users)
    return half


def convert_to_mixed(model, keep_fp32: set[str]) -> tuple[Any, dict[str, int]]:
    """Return a copy of ``model`` whose float computation is fp16 except the nodes in ``keep_fp32``.

    Graph inputs and outputs keep float32 (Casts are inserted after the input and before outputs).
    In a Q/DQ graph of opset >= 19, QuantizeLinear/DequantizeLinear follow the layers they feed: a
    DequantizeLinear whose consumers all run in fp16 gets an fp16 scale (so it outputs fp16, which is
    what TensorRT's parser makes of it), and its QuantizeLinear does too; elsewhere they stay fp32.

    Args:
        model: fp32 ``onnx.ModelProto`` (nodes in topological order, as exported), possibly with Q/DQ.
        keep_fp32: names of nodes that stay FP32.

    Returns:
        (mixed-precision model, counts ``{"fp16_nodes", "fp32_nodes", "casts"}``).
    """
    onnx = require("onnx")
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    _name_nodes(m)
    _fold_constants_to_initializers(m)
    types = float_tensor_types(m)
    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    inits = {i.name: i for i in m.graph.initializer}
    cur: dict[str, int] = {vi.name: FLOAT for vi in m.graph.input}
    half_inits: dict[str, str] = {}
    casts: dict[tuple[str, int], str] = {}
    new_nodes = []
    counts = {"fp16_nodes": 0, "fp32_nodes": 0, "casts": 0}
    used_fp32_inits: set[str] = set()
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    half_of = _half_nodes(m, keep_fp32, qdq=opset >= 19)

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            out = f"{name}__to_{'fp16' if to == HALF else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"Cast_{out}"))
            casts[key] = out
            counts["casts"] += 1
        return casts[key]

    for node in m.graph.node:
        if node.op_type in TYPE_AGNOSTIC_OPS:
            new_nodes.append(node)
            continue
        half = half_of[node.name]
        want = HALF if half else FLOAT
        skip = NON_DATA_INPUTS.get(node.op_type, frozenset())
        if any(types.get(t) == FLOAT for t in (*node.input, *node.output)):
            counts["fp16_nodes" if half else "fp32_nodes"] += 1
        for idx, inp in enumerate(node.input):
            if not inp or idx in skip or types.get(inp) != FLOAT:
                if inp in inits:
                    used_fp32_inits.add(inp)
                continue
            if inp in inits:
                if half:
                    if inp not in half_inits:
                        arr = numpy_helper.to_array(inits[inp]).astype(np.float16)
                        half_inits[inp] = f"{inp}__fp16"
                        m.graph.initializer.append(numpy_helper.from_array(arr, half_inits[inp]))
                    node.input[idx] = half_inits[inp]
                else:
                    used_fp32_inits.add(inp)
            elif cur.get(inp, FLOAT) != want:
                node.input[idx] = cast(inp, want)
        for out in node.output:
            if types.get(out) == FLOAT:
                cur[out] = want
        if node.op_type == "Cast":
            for out in node.output:
                cur[out] = node.attribute[0].i if node.attribute else FLOAT
        new_nodes.append(node)
    # graph outputs stay float32
    renames = {o.name: f"{o.name}__fp16" for o in m.graph.output if cur.get(o.name) == HALF}
    for node in new_nodes:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for i, name in enumerate(node.output):
            if name in renames:
                node.output[i] = renames[name]
    for orig, tmp in renames.items():
        new_nodes.append(helper.make_node("Cast", [tmp], [orig], to=FLOAT, name=f"Cast_{orig}_to_fp32"))
        counts["casts"] += 1
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    referenced = {i for n in new_nodes for i in n.input}
    kept_inits = [i for i in m.graph.initializer if i.name in referenced]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept_inits)
    del m.graph.value_info[:]
    m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    onnx.checker.check_model(m)
    return m, counts


def to_mixed_fp16(model, calibration: Feeds, *, policy: Fp16Policy = Fp16Policy(),
                  progress: Callable[[str], None] | None = None) -> Fp16Result:
    """Measure, choose and convert: the full FP16 transform of an fp32 graph.

    Args:
        model: fp32 ``onnx.ModelProto``.
        calibration: float32 NCHW model inputs used to measure activation ranges.
        policy: FP32-keep thresholds. Defaults to :class:`Fp16Policy` ().
        progress: one-line progress callback. Defaults to silent.
    """
    say = progress or (lambda _m: None)
    onnx = require("onnx")
    named = onnx.ModelProto()
    named.CopyFrom(model)
    _name_nodes(named)
    say(f"fp16: measuring activation ranges on {feed_count(calibration)} calibration images")
    ranges = measure_activations(named, calibration)
    kept = choose_fp32_nodes(named, ranges, policy=policy)
    say(f"fp16: converting ({len(kept)} node(s) kept in fp32)")
    mixed, counts = convert_to_mixed(named, {k.node for k in kept})
    largest = sorted(((r.absmax, n) for n, r in ranges.items() if np.isfinite(r.absmax)), reverse=True)[:5]
    exp_inputs = [ranges[n.input[0]].absmax for n in named.graph.node
                  if n.op_type in EXP_LIKE_OPS and n.input and n.input[0] in ranges]
    summary = {"tensors_measured": len(ranges),
               "largest_activations": [{"tensor": n, "absmax": float(f"{a:.4g}")} for a, n in largest],
               "activation_limit": policy.activation_max,
               "largest_softmax_input": float(f"{max(exp_inputs):.4g}") if exp_inputs else None,
               "softmax_input_limit": policy.exp_input_max}
    return Fp16Result(model=mixed, kept_fp32=tuple(kept), policy=policy, ranges_summary=summary, **counts)
