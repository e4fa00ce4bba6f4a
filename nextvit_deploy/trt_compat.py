"""Static check of an ONNX graph against what TensorRT's ONNX parser accepts, without TensorRT.

Run on every ``export --target trt``. It checks the parser's own rules that can be read off the graph
(onnx-tensorrt's importers, TensorRT 10.x/11.x), not this project's conventions:

* the opset is inside the parser's range of each TensorRT line (:data:`TRT_LINES`), and every operator
  is in the support matrix, with the few that need a newer TensorRT (:data:`OP_MIN_VERSION`);
* tensor types: no float64 (cast down), uint8 only at network I/O;
* Q/DQ: a DequantizeLinear reads int8 (or fp8/int4; never uint8, never int32 such as a quantized
  bias), a QuantizeLinear produces int8 (its zero point's type); scales constant, positive, finite,
  float32 (or float16/bfloat16 from opset 19; the scale's type is the DequantizeLinear's output type);
  zero points constant, all 0, with the scale's shape; per-channel scales only on constant inputs,
  with one scale per channel of ``axis``; a per-channel weight feeding a Conv/ConvTranspose/Gemm/
  MatMul weight input is quantized along its output-channel axis.

Where Q/DQ sit is a performance matter, not a parser rule: Q/DQ feeding other layers than Conv/Gemm/
MatMul (a residual Add, a pooling) is reported as a note. Whether TensorRT builds the graph is only
known once a builder runs; this is the part a CPU can check.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ._deps import require
from .errors import DeployError

__all__ = ["CompatIssue", "CompatReport", "check_trt_compat", "require_trt_compat", "TRT_LINES",
           "OP_MIN_VERSION", "TRT_SUPPORTED_OPS", "QDQ_COMPUTE_CONSUMERS"]

# Highest ONNX opset each TensorRT line documents (lowest: 9): onnx-tensorrt's README says 9..20 for
# TensorRT 10.0 and 9..24 for 10.15; NVIDIA's ONNX opset guide gives 25 for TensorRT 11. (Lines in
# between are treated as the older one: conservative.)
TRT_LINES: dict[str, int] = {"10.0": 20, "10.15": 24, "11.0": 25}
TRT_MIN_OPSET = 9
# Operators that need a newer parser than 10.0 (onnx-tensorrt docs/operators.md of each release).
OP_MIN_VERSION: dict[str, str] = {"Attention": "10.14", "RotaryEmbedding": "10.15", "RMSNormalization": "10.15",
                                  "TensorScatter": "10.15", "Swish": "11.0"}
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
Relu Reshape Resize RMSNormalization RotaryEmbedding Round Swish TensorScatter ScatterElements ScatterND Selu
Shape Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
# Quantized-operator forms ONNX Runtime's quantizer can emit; TensorRT has no importer for them.
TRT_UNSUPPORTED_OPS = frozenset({"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                                 "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul"})
# Layers TensorRT runs as int8 kernels from Q/DQ inputs (other consumers are a placement note).
QDQ_COMPUTE_CONSUMERS = frozenset({"Conv", "Gemm", "MatMul", "ConvTranspose"})
POOLING = frozenset({"AveragePool", "MaxPool", "LpPool"})

Severity = Literal["error", "warning", "note"]


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


@dataclass(frozen=True)
class CompatIssue:
    severity: Severity
    rule: str  # short id: "opset", "operator", "dtype", "qdq-zero-point", "qdq-axis", "qdq-placement", ...
    node: str
    message: str
    min_version: str | None = None  # fixed from this TensorRT line on (opset/operator rules)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"severity": self.severity, "rule": self.rule, "node": self.node, "message": self.message}
        if self.min_version:
            d["min_version"] = self.min_version
        return d

    def __str__(self) -> str:
        return f"{self.severity}: [{self.rule}] {self.node}: {self.message}"


@dataclass(frozen=True)
class CompatReport:
    """Result of :func:`check_trt_compat`; ``bool(report)`` is True when some TensorRT line parses it."""

    opset: int
    op_counts: dict[str, int]
    quantized: bool
    issues: tuple[CompatIssue, ...] = ()
    checked: tuple[str, ...] = field(default=())
    versions: dict[str, bool] = field(default_factory=dict)  # TensorRT line -> parses

    @property
    def errors(self) -> list[CompatIssue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[CompatIssue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def min_version(self) -> str | None:
        """The oldest TensorRT line that parses the graph, or None."""
        ok = [v for v, passed in self.versions.items() if passed]
        return min(ok, key=_version_key) if ok else None

    def __bool__(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        kinds = f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        lines = f", TensorRT >= {self.min_version}" if self else ""
        return f"TensorRT parser compatibility: {'ok' if self else 'FAILED'} (opset {self.opset}{lines}, {kinds})"

    def to_dict(self) -> dict[str, Any]:
        return {"passed": bool(self), "opset": self.opset, "quantized": self.quantized,
                "versions": dict(self.versions), "min_tensorrt": self.min_version,
                "issues": [i.to_dict() for i in self.issues], "checked": list(self.checked),
                "summary": self.summary()}


def _load(model_or_path):
    onnx = require("onnx")
    if isinstance(model_or_path, (str, Path)):
        return onnx.load(str(model_or_path))
    return model_or_path


def check_trt_compat(model_or_path, *, trt_version: str | None = None) -> CompatReport:
    """Check an ONNX model (``ModelProto`` or path) against TensorRT's ONNX parser rules.

    Args:
        model_or_path: the TensorRT-ready graph.
        trt_version: check for this TensorRT line only (e.g. "10.0", "11.0"). Defaults to every line of
            :data:`TRT_LINES`: a rule that only some lines meet is a warning naming the oldest line that
            parses the graph, and an error when none does.

    Returns:
        A :class:`CompatReport`; errors make ``bool(report)`` False.
    """
    onnx = require("onnx")
    from onnx import TensorProto, numpy_helper

    model = _load(model_or_path)
    issues: list[CompatIssue] = []
    try:
        g = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except Exception as exc:  # noqa: BLE001 - e.g. a foreign-domain op: check what the raw graph declares
        g = model.graph
        issues.append(CompatIssue("warning", "shape-inference", "<model>",
                                  f"ONNX shape inference failed ({str(exc).splitlines()[0][:120]}); "
                                  "dtype checks limited to declared tensors"))

    def add(sev: Severity, rule: str, node: str, msg: str, min_version: str | None = None) -> None:
        issues.append(CompatIssue(sev, rule, node, msg, min_version))

    lines = {trt_version: TRT_LINES.get(trt_version, max(TRT_LINES.values()))} if trt_version else dict(TRT_LINES)
    parses = dict.fromkeys(lines, True)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    for line, ceiling in lines.items():
        if not TRT_MIN_OPSET <= opset <= ceiling:
            parses[line] = False
    inits = {i.name: i for i in g.initializer}
    const_out = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    types: dict[str, int] = {}
    shapes: dict[str, tuple] = {}
    for vi in (*g.input, *g.output, *g.value_info):
        tt = vi.type.tensor_type
        types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    for name, init in inits.items():
        types[name] = init.data_type
        shapes[name] = tuple(init.dims)
    for out, node in const_out.items():
        if node.attribute and node.attribute[0].name == "value":
            types[out] = node.attribute[0].t.data_type
            shapes[out] = tuple(node.attribute[0].t.dims)
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
        need = OP_MIN_VERSION.get(node.op_type)
        if need:
            for line in lines:
                if _version_key(line) < _version_key(need):
                    parses[line] = False
        if node.op_type in POOLING and node.input and len(shapes.get(node.input[0], ())) == 3:
            add("note", "pooling-1d", label, "1-D pooling: the parser unsqueezes it to 2-D")
        for out in node.output:
            t = types.get(out)
            if t == TensorProto.DOUBLE:
                add("warning", "dtype", label, f"{out} is float64: TensorRT casts it down to float32")
            if t == TensorProto.UINT8 and out not in io_names:
                add("error", "dtype", label, f"{out} is uint8 inside the network: TensorRT accepts uint8 only as "
                                             "network input/output (use the tensorrt int8 convention)")
    quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.node)
    if quantized:
        _check_qdq(g, opset, inits, const_out, types, shapes, producers, consumers, add, numpy_helper, TensorProto)
    if not any(parses.values()):
        if not TRT_MIN_OPSET <= opset <= max(lines.values()):
            add("error", "opset", "<model>", f"opset {opset} is outside every TensorRT parser range "
                                             f"({TRT_MIN_OPSET}..{max(lines.values())}): re-export with --opset 17")
        else:
            add("error", "version", "<model>", "no TensorRT line parses every operator of this graph")
    elif not all(parses.values()):
        oldest = min((v for v, ok in parses.items() if ok), key=_version_key)
        add("warning", "version", "<model>", f"needs TensorRT >= {oldest} (opset {opset}"
            + (f", {sorted(o for o in op_counts if o in OP_MIN_VERSION)}" if any(o in OP_MIN_VERSION for o in op_counts)
               else "") + "): older parsers reject it", oldest)
    checked = ("opset per TensorRT line", "domains", "operator support matrix", "dtypes") + \
        (("Q/DQ dtype, scale, zero-point and axis rules",) if quantized else ())
    return CompatReport(opset=opset, op_counts=dict(sorted(op_counts.items())), quantized=quantized,
                        issues=tuple(issues), checked=checked, versions=parses)


# Element types a DequantizeLinear may read / a QuantizeLinear may produce in TensorRT.
def _quantized_types(TensorProto) -> dict[int, str]:
    out = {TensorProto.INT8: "int8"}
    for name in ("FLOAT8E4M3FN", "INT4"):
        if hasattr(TensorProto, name):
            out[getattr(TensorProto, name)] = name.lower()
    return out


def _weight_axis(user, slot_rank: int) -> int | None:
    """Output-channel axis of the weight input of a compute layer (None: no rule for that layer)."""
    if user.op_type == "Conv":
        return 0
    if user.op_type == "ConvTranspose":
        return 1
    if user.op_type == "Gemm":
        return 0 if next((a.i for a in user.attribute if a.name == "transB"), 0) else 1
    if user.op_type == "MatMul":
        return slot_rank - 1
    return None


def _check_qdq(g, opset, inits, const_out, types, shapes, producers, consumers, add, numpy_helper,
               TensorProto) -> None:
    qtypes = _quantized_types(TensorProto)
    scale_types = {TensorProto.FLOAT: "float32"}
    if opset >= 19:
        scale_types.update({TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"})

    def const(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = const_out.get(name)
        return numpy_helper.to_array(node.attribute[0].t) if node is not None else None

    def dtype_name(t: int | None) -> str:
        return TensorProto.DataType.Name(t) if t else "unknown"

    for node in g.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        label = node.name or node.output[0]
        is_q = node.op_type == "QuantizeLinear"
        scale_name = node.input[1] if len(node.input) > 1 else ""
        scale = const(scale_name) if scale_name else None
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zp = const(zp_name) if zp_name else None
        if scale is None:
            add("error", "qdq-scale", label, "scale must be a constant (initializer)")
            continue
        if not (np.isfinite(scale.astype(np.float32)).all() and (scale.astype(np.float32) > 0).all()):
            add("error", "qdq-scale", label, "scales must be positive and finite")
        if types.get(scale_name) not in scale_types:
            add("error", "qdq-scale", label, f"scale is {dtype_name(types.get(scale_name))}: TensorRT takes "
                f"{'/'.join(scale_types.values())} scales at opset {opset}"
                + (" (float16 scales need opset >= 19)" if opset < 19 else ""))
        # the quantized side: a DequantizeLinear's input, a QuantizeLinear's output (= its zero point's type)
        q_type = types.get(node.output[0]) if is_q else types.get(node.input[0])
        if is_q and zp is None and not zp_name:
            q_type = TensorProto.UINT8  # ONNX: no zero point means uint8
        if q_type not in qtypes:
            side = "produces" if is_q else "reads"
            add("error", "qdq-dtype", label, f"{node.op_type} {side} {dtype_name(q_type)}: TensorRT quantizes to "
                f"{'/'.join(qtypes.values())} only" + (" (a zero point gives QuantizeLinear its type: use an int8 "
                                                       "zero point 0)" if is_q else ""))
        if zp_name and zp is None:
            add("error", "qdq-zero-point", label, "zero point must be a constant")
        elif zp is not None:
            if np.any(zp.astype(np.float32) != 0):
                add("error", "qdq-zero-point", label, "zero point must be 0 (TensorRT quantization is symmetric)")
            if zp.size != scale.size:
                add("error", "qdq-zero-point", label, f"zero point has {zp.size} values, scale {scale.size}: "
                                                      "TensorRT needs the same shape")
        data = node.input[0]
        data_const = data in inits or data in const_out or (
            not is_q and producers.get(data) is not None and producers[data].op_type == "QuantizeLinear"
            and producers[data].input[0] in inits)
        if scale.size > 1:
            rank = len(shapes.get(data, ()))
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            axis = axis + rank if axis < 0 and rank else axis
            if not data_const:
                add("error", "qdq-per-tensor", label, "per-channel scales on an activation: TensorRT quantizes "
                                                      "activations per tensor (one scalar scale)")
            elif rank and (axis >= rank or (shapes[data][axis] not in (None, scale.size))):
                add("error", "qdq-axis", label, f"{scale.size} scales for axis {axis} of a {list(shapes[data])} "
                                                "tensor: TensorRT needs one scale per channel of that axis")
            elif not is_q:
                for user in consumers.get(node.output[0], []):
                    slot = list(user.input).index(node.output[0])
                    want = _weight_axis(user, rank) if slot == 1 else None
                    if want is not None and axis != want:
                        add("error", "qdq-axis", label, f"per-channel weight of {user.op_type} "
                                                        f"{user.name or user.output[0]} is quantized on axis {axis}; "
                                                        f"TensorRT needs its output-channel axis {want}")
        if is_q:
            if any(u.op_type != "DequantizeLinear" for u in consumers.get(node.output[0], [])):
                add("warning", "qdq-pair", label, "QuantizeLinear feeds a layer other than DequantizeLinear; "
                                                  "TensorRT's builder expects a Q -> DQ pair")
            continue
        others = sorted({u.op_type for u in consumers.get(node.output[0], [])} - QDQ_COMPUTE_CONSUMERS)
        if others:
            add("note", "qdq-placement", label, f"feeds {', '.join(others)}: runs as an int8 input there "
                                                "(fused into the neighbouring kernel or requantized)")


def require_trt_compat(model_or_path, *, context: str = "TensorRT-ready ONNX") -> CompatReport:
    """Run :func:`check_trt_compat` and raise a one-line :class:`DeployError` on any error."""
    report = check_trt_compat(model_or_path)
    if not report:
        first = report.errors[0]
        more = f" (+{len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
        raise DeployError(f"{context} would not parse in TensorRT: {first}{more}; "
                          "this is a bug in the precision transform, please report it with the manifest")
    return report
