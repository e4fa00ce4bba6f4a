"""Passes around ONNX Runtime's Q/DQ graph and what is left of it once ONNX Runtime has fused it.

Before quantization, :func:`unshare_initializers` gives each quantized reader of a shared weight or bias its
own copy (one scale per reader, or ONNX Runtime leaves the Conv in float). After it,
:func:`remove_identity_pairs` and :func:`pools_as_convs` (AveragePool as an int8 depthwise Conv), then the audit.

ONNX Runtime's CPU execution provider fuses ``DequantizeLinear -> op -> QuantizeLinear`` groups into
QLinear*/QGemm kernels at load time and drops what it can prove redundant (a ``Relu`` before a
``QuantizeLinear`` whose zero point is the type's minimum, a ``QuantizeLinear -> DequantizeLinear ->
QuantizeLinear -> DequantizeLinear`` chain with one scale). What survives costs time:

* **DQ -> Q pairs** (:func:`dq_q_pairs`): a quantized tensor dequantized only to be quantized again. With
  the same scale and zero point the pair is an identity (:func:`remove_identity_pairs` drops it); with
  different ones it is a float round trip ONNX Runtime cannot fuse.
* **float islands** (:func:`float_islands`): nodes that read a DequantizeLinear output, i.e. run in float
  between quantized neighbours (``Shape`` and other metadata readers excluded: they read no values).

:func:`audit` loads a graph the way ``bench``/``eval`` do (ONNX Runtime CPU, extended graph optimizations,
which include every QDQ fusion but not the machine-specific layout passes) and reports both, with the
operator counts before and after.
"""
from __future__ import annotations

import collections
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .._deps import require

__all__ = ["dq_q_pairs", "float_islands", "remove_identity_pairs", "unshare_initializers", "pools_as_convs",
           "ort_optimized", "audit"]

# Ops that read only a tensor's shape/type, never its values: a DQ feeding them is no float island.
_METADATA_OPS = frozenset({"Shape", "Size"})
# Quantization-transparent ops: ONNX Runtime moves Q/DQ across them (QDQ propagation).
_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})
_FLOAT_TYPES = frozenset({1, 10, 11, 16})  # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _constants(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _qparams(node, consts: dict[str, np.ndarray]) -> tuple[np.ndarray | None, np.ndarray | None, int]:
    """(scale, zero point, axis) of a Q/DQ node; a zero point left out is 0 (uint8), a missing constant None."""
    scale = consts.get(node.input[1]) if len(node.input) > 1 else None
    zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    return scale, zp, axis


def _same_qparams(a, b, consts: dict[str, np.ndarray]) -> bool:
    (sa, za, xa), (sb, zb, xb) = _qparams(a, consts), _qparams(b, consts)
    if sa is None or sb is None or za is None or zb is None or za.dtype != zb.dtype:
        return False
    if sa.shape != sb.shape or za.shape != zb.shape or (sa.ndim > 0 and xa != xb):
        return False
    return bool(np.array_equal(sa, sb) and np.array_equal(za, zb))


def _pairs(model) -> list[tuple[int, int, bool]]:
    """(DQ index, Q index, same quantization parameters) of every DQ -> Q edge."""
    consts = _constants(model)
    nodes = list(model.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    out = []
    for qi, n in enumerate(nodes):
        di = producer.get(n.input[0]) if n.op_type == "QuantizeLinear" else None
        if di is not None and nodes[di].op_type == "DequantizeLinear":
            out.append((di, qi, _same_qparams(nodes[di], n, consts)))
    return out


def dq_q_pairs(model) -> list[dict[str, Any]]:
    """Every ``DequantizeLinear -> QuantizeLinear`` edge: the two node names, the tensor and ``same_scale``
    (scale, zero point, type and axis identical: the pair is an identity on the quantized values)."""
    nodes = model.graph.node
    return [{"dq": nodes[d].name, "q": nodes[q].name, "tensor": nodes[q].input[0], "same_scale": same}
            for d, q, same in _pairs(model)]


def float_islands(model) -> collections.Counter[str]:
    """Operator type -> number of nodes that run in float between quantized neighbours: every node that reads
    a DequantizeLinear output, or the output of such a node, up to the next QuantizeLinear (metadata readers
    and the Q/DQ nodes themselves excluded; nodes before the first QuantizeLinear are not counted)."""
    floats: set[str] = set()
    found: collections.Counter[str] = collections.Counter()
    for n in model.graph.node:  # ONNX graphs are stored in topological order
        if n.op_type == "DequantizeLinear":
            floats.update(n.output)
        elif n.op_type != "QuantizeLinear" and n.op_type not in _METADATA_OPS and any(i in floats for i in n.input):
            found[n.op_type] += 1
            floats.update(n.output)
    return found


def remove_identity_pairs(model) -> tuple[Any, int]:
    """A copy of ``model`` without the DQ -> Q pairs whose scale and zero point agree: every reader of the
    Q's output reads the DQ's quantized input instead (exact: Q(DQ(x)) == x for one scale and zero point).

    The DQ stays while anything else reads it; a Q that is a graph output is kept. Returns (model, removed).
    """
    onnx = require("onnx")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    outputs = {o.name for o in m.graph.output}
    rename: dict[str, str] = {}
    drop: set[int] = set()
    nodes = list(m.graph.node)
    for d, q, same in _pairs(m):
        if same and nodes[q].output[0] not in outputs:
            rename[nodes[q].output[0]] = nodes[d].input[0]
            drop.add(q)
    if not rename:
        return m, 0

    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    kept = [n for i, n in enumerate(nodes) if i not in drop]
    for n in kept:
        for i, name in enumerate(n.input):
            n.input[i] = resolve(name)
    readers = {i for n in kept for i in n.input} | outputs
    kept = [n for n in kept if n.op_type != "DequantizeLinear" or any(o in readers for o in n.output)]
    del m.graph.node[:]
    m.graph.node.extend(kept)
    return m, len(drop)


def unshare_initializers(model, op_types) -> tuple[Any, int]:
    """A copy of ``model`` where each float initializer read by a node of ``op_types`` has one reader only.

    ``quantize_static`` quantizes an initializer once, with the scale of its first reader: a bias shared by
    two Convs (the exporter merges equal tensors) gets the first Conv's input scale x weight scale, the second
    Conv's bias then disagrees with its own and ONNX Runtime leaves that Conv in float; a bias shared by a
    Conv and an Add becomes an int32 DequantizeLinear -> QuantizeLinear pair. Every extra reader gets its own
    copy (``<name>__unshared<k>``). Returns (model, copies made).
    """
    onnx = require("onnx")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: i for i in m.graph.initializer}
    readers: dict[str, list[tuple[Any, int]]] = {}
    for n in m.graph.node:
        for k, name in enumerate(n.input):
            if name in inits and inits[name].data_type in _FLOAT_TYPES:
                readers.setdefault(name, []).append((n, k))
    copies = []
    for name, uses in readers.items():
        if len(uses) < 2 or not any(n.op_type in op_types for n, _ in uses):
            continue
        for j, (n, k) in enumerate(uses[1:], start=1):
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[name])
            copy.name = f"{name}__unshared{j}"
            n.input[k] = copy.name
            copies.append(copy)
    m.graph.initializer.extend(copies)
    return m, len(copies)


def _pool_as_conv(node, shape: list[int | None]) -> tuple[list[int], list[int]] | None:
    """(kernel, strides) of an AveragePool that equals a depthwise Conv with weights 1/window on an input of
    ``shape``, else None: no padding, no dilation, and every window full (floor mode, or ceil mode on
    sizes the windows tile exactly), so ``count_include_pad`` cannot matter."""
    attrs = {a.name: a for a in node.attribute}
    kernel = list(attrs["kernel_shape"].ints) if "kernel_shape" in attrs else []
    strides = list(attrs["strides"].ints) if "strides" in attrs else [1] * len(kernel)
    if not kernel or len(shape) != len(kernel) + 2 or shape[1] is None:
        return None
    if "pads" in attrs and any(attrs["pads"].ints):
        return None
    if "auto_pad" in attrs and attrs["auto_pad"].s not in (b"", b"NOTSET", b"VALID"):
        return None
    if "dilations" in attrs and any(d != 1 for d in attrs["dilations"].ints):
        return None
    if "ceil_mode" in attrs and attrs["ceil_mode"].i:
        spatial = shape[2:]
        if any(d is None or d < k or (d - k) % st for d, k, st in zip(spatial, kernel, strides)):
            return None
    return kernel, strides


def pools_as_convs(model) -> tuple[Any, int]:
    """A copy of ``model`` where each AveragePool between a DequantizeLinear and a QuantizeLinear (layout ops
    in between allowed) is a depthwise Conv with int8 weights 1 and weight scale 1/window (exactly the same average).

    ONNX Runtime fuses ``DQ -> AveragePool -> Q`` into QLinearAveragePool, a slow kernel on x86 (Next-ViT-S
    batch 1: 5 % of the INT8 graph's node time for its 6 pools, 25x the FP32 AveragePool), and the same
    average as a ``DQ -> Conv -> Q`` into its depthwise QLinearConv, which costs next to nothing there.
    Pools with padding, dilation or a partial window (ceil mode) are left alone. Returns (model, rewritten).
    """
    onnx = require("onnx")
    from onnx import helper, numpy_helper

    m = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in list(m.graph.value_info) + list(m.graph.input)}
    producer = {o: n for n in m.graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    added, done = [], 0
    def from_dq(tensor: str) -> bool:  # through layout ops, as ONNX Runtime's QDQ propagation moves a DQ
        node = producer.get(tensor)
        while node is not None and node.op_type in _LAYOUT_OPS:
            node = producer.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear"

    def to_q(tensor: str) -> bool:
        users = readers.get(tensor, [])
        return bool(users) and all(u.op_type == "QuantizeLinear" or (u.op_type in _LAYOUT_OPS and to_q(u.output[0]))
                                   for u in users)

    for n in m.graph.node:
        if n.op_type != "AveragePool" or not from_dq(n.input[0]) or not to_q(n.output[0]):
            continue
        geometry = _pool_as_conv(n, shapes.get(n.input[0], []))
        if geometry is None:
            continue
        kernel, strides = geometry
        channels = shapes[n.input[0]][1]
        assert channels is not None  # _pool_as_conv refuses a pool without a static channel count
        base = f"{n.name or n.output[0]}__as_conv"
        added += [numpy_helper.from_array(np.ones([channels, 1, *kernel], np.int8), f"{base}_w"),
                  numpy_helper.from_array(np.array(1.0 / np.prod(kernel), np.float32), f"{base}_w_scale"),
                  numpy_helper.from_array(np.array(0, np.int8), f"{base}_w_zero_point")]
        dq = helper.make_node("DequantizeLinear", [f"{base}_w", f"{base}_w_scale", f"{base}_w_zero_point"],
                              [f"{base}_w_dq"], name=f"{base}_w_DequantizeLinear")
        conv = helper.make_node("Conv", [n.input[0], f"{base}_w_dq"], list(n.output), name=n.name,
                                kernel_shape=kernel, strides=strides, group=channels)
        n.CopyFrom(conv)
        added.append(dq)
        done += 1
    if not done:
        return model, 0
    weight_dqs = [a for a in added if isinstance(a, onnx.NodeProto)]
    m.graph.initializer.extend(a for a in added if isinstance(a, onnx.TensorProto))
    nodes = weight_dqs + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    del m.graph.value_info[:]
    return m, done


def ort_optimized(model, *, threads: int = 1):
    """The graph ONNX Runtime CPU runs for ``model`` (extended optimizations: QDQ fusions, no layout passes)."""
    onnx = require("onnx")
    ort = require("onnxruntime", purpose="the INT8 graph audit")
    with tempfile.TemporaryDirectory(prefix="nextvit-qdq-audit-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "optimized.onnx"
        onnx.save(model, str(src))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.intra_op_num_threads = threads
        opts.optimized_model_filepath = str(dst)
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
        return onnx.load(str(dst))


def _op_counts(model) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in model.graph.node).most_common())


def audit(model) -> dict[str, Any]:
    """Q/DQ counts, DQ -> Q pairs and float islands of ``model`` as saved and as ONNX Runtime runs it."""
    optimized = ort_optimized(model)
    saved_pairs, run_pairs = dq_q_pairs(model), dq_q_pairs(optimized)
    return {
        "saved": {"ops": _op_counts(model), "dq_q_pairs": len(saved_pairs),
                  "dq_q_pairs_same_scale": sum(p["same_scale"] for p in saved_pairs)},
        "ort_cpu": {"ops": _op_counts(optimized), "dq_q_pairs": len(run_pairs),
                    "dq_q_pairs_same_scale": sum(p["same_scale"] for p in run_pairs),
                    "dq_q_pair_tensors": [p["tensor"] for p in run_pairs],
                    "float_islands": dict(float_islands(optimized).most_common())},
    }
