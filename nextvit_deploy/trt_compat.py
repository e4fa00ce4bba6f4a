"""Static check of an ONNX graph against what TensorRT's ONNX parser accepts, without TensorRT.

Run on every ``export --target trt``. It checks what can be checked from the graph alone:

* opset within the parser's range (TensorRT 10.x: opset 9 to 20 in 10.0, up to 24 in 10.15+/11.x),
* standard-domain operators only, each one in the parser's support matrix (onnx-tensorrt
  ``docs/operators.md``), with the restrictions that matter here (Conv/Gemm weights constant, pooling
  1-D is expanded to 2-D by the parser, 2-D/3-D otherwise),
* tensor types: no uint8 inside the network (TensorRT allows it only at network I/O), int8 only as
  the output of QuantizeLinear / input of DequantizeLinear, no float64,
* explicit-quantization rules: int8 zero points that are all 0, positive finite scales, a
  QuantizeLinear always followed by a DequantizeLinear, per-tensor (scalar) activation scales,
  per-channel weight scales on the output-channel axis, and Q/DQ only on the inputs of Conv, Gemm,
  MatMul (and ConvTranspose), the layers TensorRT fuses into int8 kernels.

Whether TensorRT actually builds the graph is only known once a builder runs; this is the part we
can verify on a CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np

from ._deps import require
from .errors import DeployError

__all__ = ["CompatIssue", "CompatReport", "check_trt_compat", "require_trt_compat", "TRT_OPSET_RANGE",
           "TRT_SUPPORTED_OPS", "QDQ_CONSUMERS"]

# TensorRT 10.0 documents opset 9..20; 10.15 and 11.x document 9..24.
TRT_OPSET_RANGE = (9, 24)
TRT_OPSET_ALL_10X = 20
# The operators of onnx-tensorrt's support matrix (TensorRT 10.x) that a vision model can produce.
TRT_SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization Cast
CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization HardSigmoid HardSwish Hardmax Identity If InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax LpNormalization LpPool LRN MatMul Max MaxPool
Mean Min Mish Mod Mul Neg NonZero Not OneHot Or Pad Pow PRelu QuantizeLinear Range Reciprocal ReduceL1
ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare
Relu Reshape Resize Round ScatterElements ScatterND Selu Shape Sigmoid Sign Sin Sinh Size Slice Softmax
Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose
Trilu Unsqueeze Upsample Where Xor
""".split())
# Listed as unsupported ("N") in the matrix; named explicitly because quantizers emit them.
TRT_UNSUPPORTED_OPS = frozenset({"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                                 "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul"})
# Layers whose inputs may carry Q/DQ (TensorRT fuses them into int8 kernels).
QDQ_CONSUMERS = frozenset({"Conv", "Gemm", "MatMul", "ConvTranspose"})
POOLING = frozenset({"AveragePool", "MaxPool", "LpPool"})

Severity = Literal["error", "warning", "note"]


@dataclass(frozen=True)
class CompatIssue:
    severity: Severity
    rule: str  # short id: "opset", "operator", "dtype", "qdq-zero-point", "qdq-placement", ...
    node: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "rule": self.rule, "node": self.node, "message": self.message}

    def __str__(self) -> str:
        return f"{self.severity}: [{self.rule}] {self.node}: {self.message}"


@dataclass(frozen=True)
class CompatReport:
    """Result of :func:`check_trt_compat`; ``bool(report)`` is True when there is no error."""

    opset: int
    op_counts: dict[str, int]
    quantized: bool
    issues: tuple[CompatIssue, ...] = ()
    checked: tuple[str, ...] = field(default=())

    @property
    def errors(self) -> list[CompatIssue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[CompatIssue]:
        return [i for i in self.issues if i.severity == "warning"]

    def __bool__(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        kinds = f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        return f"TensorRT parser compatibility: {'ok' if self else 'FAILED'} (opset {self.opset}, {kinds})"

    def to_dict(self) -> dict[str, Any]:
        return {"passed": bool(self), "opset": self.opset, "quantized": self.quantized,
                "issues": [i.to_dict() for i in self.issues], "checked": list(self.checked),
                "summary": self.summary()}


def _load(model_or_path):
    onnx = require("onnx")
    if isinstance(model_or_path, (str, Path)):
        return onnx.load(str(model_or_path))
    return model_or_path


def check_trt_compat(model_or_path, *, max_opset: Optional[int] = None) -> CompatReport:
    """Check an ONNX model (``ModelProto`` or path) against TensorRT's ONNX parser rules.

    Args:
        model_or_path: the TensorRT-ready graph.
        max_opset: highest opset the targeted TensorRT parses. Defaults to 24 (10.15+/11.x), with a
            warning above 20 (the TensorRT 10.0 limit).

    Returns:
        A :class:`CompatReport`; errors make ``bool(report)`` False.
    """
    onnx = require("onnx")
    from onnx import TensorProto, numpy_helper

    model = _load(model_or_path)
    issues: list[CompatIssue] = []
    try:
        g = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except Exception as exc:  # e.g. an operator of an unknown domain: check what the raw graph says
        g = model.graph
        issues.append(CompatIssue("warning", "shape-inference", "<model>",
                                  f"ONNX shape inference failed ({str(exc).splitlines()[0][:120]}); "
                                  "dtype checks limited to declared tensors"))

    def add(sev: Severity, rule: str, node: str, msg: str) -> None:
        issues.append(CompatIssue(sev, rule, node, msg))

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    lo, hi = TRT_OPSET_RANGE[0], max_opset or TRT_OPSET_RANGE[1]
    if not lo <= opset <= hi:
        add("error", "opset", "<model>", f"opset {opset} is outside TensorRT's parser range {lo}..{hi}: "
                                         f"re-export with --opset 17")
    elif opset > TRT_OPSET_ALL_10X:
        add("warning", "opset", "<model>", f"opset {opset} needs TensorRT >= 10.15 (10.0 parses up to "
                                           f"{TRT_OPSET_ALL_10X}): re-export with --opset 17 for every 10.x")
    inits = {i.name: i for i in g.initializer}
    const_out = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    types: dict[str, int] = {}
    ranks: dict[str, int] = {}
    for vi in (*g.input, *g.output, *g.value_info):
        tt = vi.type.tensor_type
        types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            ranks[vi.name] = len(tt.shape.dim)
    for name, init in inits.items():
        types[name] = init.data_type
        ranks[name] = len(init.dims)
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    io_names = {v.name for v in (*g.input, *g.output)}
    op_counts: dict[str, int] = {}
    for node in g.node:
        op_counts[node.op_type] = op_counts.get(node.op_type, 0) + 1
        label = node.name or f"{node.op_type}({node.output[0]})"
        if node.domain not in ("", "ai.onnx"):
            add("error", "domain", label, f"operator {node.domain}::{node.op_type} is not a standard ONNX operator; "
                                          "TensorRT's parser needs a plugin for it")
            continue
        if node.op_type in TRT_UNSUPPORTED_OPS or node.op_type not in TRT_SUPPORTED_OPS:
            add("error", "operator", label, f"{node.op_type} is not supported by TensorRT's ONNX parser"
                + (" (use the QDQ form: QuantizeLinear/DequantizeLinear around float ops)"
                   if node.op_type.startswith(("QLinear", "MatMulInteger", "ConvInteger")) else ""))
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
            w = node.input[1]
            wsrc = producers.get(w)
            if w not in inits and w not in const_out and not (wsrc is not None and wsrc.op_type == "DequantizeLinear"
                                                              and wsrc.input[0] in inits):
                add("warning", "conv-weights", label, "weights are computed at run time; TensorRT's Conv "
                                                      "importer expects an initializer (or DQ of one)")
        if node.op_type in POOLING and node.input and ranks.get(node.input[0]) == 3:
            add("note", "pooling-1d", label, "1-D pooling: the parser unsqueezes it to 2-D (onnx-tensorrt "
                                             "poolingHelper); the matrix lists 2-D/3-D pooling")
        for out in node.output:
            t = types.get(out)
            if t == TensorProto.DOUBLE:
                add("warning", "dtype", label, f"{out} is float64: TensorRT casts it down to float32")
            if t == TensorProto.UINT8 and out not in io_names:
                add("error", "dtype", label, f"{out} is uint8 inside the network: TensorRT accepts uint8 only as "
                                             "network input/output (use the tensorrt int8 convention)")
            if t == TensorProto.INT8 and node.op_type != "QuantizeLinear":
                add("error", "dtype", label, f"{out} is int8 but not produced by QuantizeLinear: TensorRT treats "
                                             "int8 as a quantized type reachable only through Q/DQ")
    quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.node)
    if quantized:
        _check_qdq(g, inits, producers, consumers, add, numpy_helper, TensorProto)
    checked = ("opset", "domains", "operator support matrix", "dtypes") + (("Q/DQ rules",) if quantized else ())
    return CompatReport(opset=opset, op_counts=dict(sorted(op_counts.items())), quantized=quantized,
                        issues=tuple(issues), checked=checked)


def _check_qdq(g, inits, producers, consumers, add, numpy_helper, TensorProto) -> None:
    def const(name: str) -> Optional[np.ndarray]:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        p = producers.get(name)
        if p is not None and p.op_type == "Constant":
            return numpy_helper.to_array(p.attribute[0].t)
        return None

    for node in g.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        label = node.name or node.output[0]
        scale = const(node.input[1]) if len(node.input) > 1 else None
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zp = const(zp_name) if zp_name else None
        if scale is None:
            add("error", "qdq-scale", label, "scale must be a constant (initializer)")
            continue
        if not (np.isfinite(scale).all() and (scale > 0).all()):
            add("error", "qdq-scale", label, "scales must be positive and finite")
        if zp is None:
            if zp_name:
                add("error", "qdq-zero-point", label, "zero point must be a constant")
            else:
                add("warning", "qdq-zero-point", label, "no zero point: ONNX then means uint8; give an int8 zero point 0")
        else:
            if zp.dtype != np.int8:
                add("error", "qdq-zero-point", label, f"zero point is {zp.dtype}: TensorRT needs int8 (symmetric, 0)")
            if np.any(zp != 0):
                add("error", "qdq-zero-point", label, "zero point must be 0 (TensorRT quantization is symmetric)")
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        per_channel = scale.size > 1
        if node.op_type == "QuantizeLinear":
            users = consumers.get(node.output[0], [])
            if not users or any(u.op_type != "DequantizeLinear" for u in users):
                add("error", "qdq-pair", label, "QuantizeLinear must feed DequantizeLinear nodes only")
            if per_channel and node.input[0] not in inits:
                add("error", "qdq-per-tensor", label, "activation scales must be per-tensor (one scalar)")
            continue
        # DequantizeLinear
        src = node.input[0]
        from_weight = src in inits
        if not from_weight:
            p = producers.get(src)
            if p is None or p.op_type != "QuantizeLinear":
                add("error", "qdq-pair", label, "DequantizeLinear input must be an int8 weight or a QuantizeLinear output")
            elif p.input[0] in inits:
                from_weight = True
        if per_channel and not from_weight:
            add("error", "qdq-per-tensor", label, "activation scales must be per-tensor (one scalar)")
        for user in consumers.get(node.output[0], []):
            ulabel = user.name or user.output[0]
            if user.op_type not in QDQ_CONSUMERS:
                add("error", "qdq-placement", label, f"feeds {user.op_type} {ulabel}: Q/DQ belong on inputs of "
                                                     "Conv/Gemm/MatMul only, where TensorRT fuses them")
                continue
            slot = list(user.input).index(node.output[0])
            if from_weight and per_channel:
                w_rank = len(inits[src].dims) if src in inits else None
                if user.op_type == "Conv":
                    want = 0
                elif user.op_type == "ConvTranspose":
                    want = 1
                elif user.op_type == "Gemm":
                    want = 0 if next((a.i for a in user.attribute if a.name == "transB"), 0) else 1
                else:
                    want = (w_rank - 1) if w_rank else axis
                if slot != 1 or axis % max(w_rank or 1, 1) != want:
                    add("error", "qdq-axis", label, f"per-channel weight scales must be on the output-channel axis "
                                                    f"{want} of {user.op_type} input 1 (got axis {axis}, input {slot})")
            if slot >= 2:
                add("error", "qdq-placement", label, f"quantizes input {slot} (bias) of {user.op_type}: TensorRT "
                                                     "expects a float bias")


def require_trt_compat(model_or_path, *, context: str = "TensorRT-ready ONNX") -> CompatReport:
    """Run :func:`check_trt_compat` and raise a one-line :class:`DeployError` on any error."""
    report = check_trt_compat(model_or_path)
    if not report:
        first = report.errors[0]
        more = f" (+{len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
        raise DeployError(f"{context} would not parse in TensorRT: {first}{more}; "
                          "this is a bug in the precision transform, please report it with the manifest")
    return report
