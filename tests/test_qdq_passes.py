"""The Q/DQ graph audit (DQ -> Q pairs, float islands) and the identity-pair pass, on hand-built graphs."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from nextvit_deploy.export.qdq_passes import (
    audit,
    dq_q_pairs,
    float_islands,
    pools_as_convs,
    remove_identity_pairs,
    unshare_initializers,
)


def _chain(second_scale: float):
    """input -> Q(s) -> DQ(s) -> Q(second) -> DQ(second) -> Relu -> output, uint8 zero point 3; the first DQ
    also feeds a second output through its own Relu (so ONNX Runtime cannot merge the chain into one pair)."""
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s1"),
             numpy_helper.from_array(np.array(second_scale, np.float32), "s2"),
             numpy_helper.from_array(np.array(3, np.uint8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s1", "z"], ["q1"], name="q1"),
             helper.make_node("DequantizeLinear", ["q1", "s1", "z"], ["dq1"], name="dq1"),
             helper.make_node("QuantizeLinear", ["dq1", "s2", "z"], ["q2"], name="q2"),
             helper.make_node("DequantizeLinear", ["q2", "s2", "z"], ["dq2"], name="dq2"),
             helper.make_node("Relu", ["dq2"], ["output"], name="relu"),
             helper.make_node("Relu", ["dq1"], ["side"], name="side")]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 8]) for n in ("input", "output", "side")]
    graph = helper.make_graph(nodes, "chain", io[:1], io[1:], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})


def test_identity_pair_is_found_removed_and_exact():
    model = _chain(0.05)
    pairs = dq_q_pairs(model)
    assert [(p["dq"], p["q"], p["same_scale"]) for p in pairs] == [("dq1", "q2", True)]
    out, removed = remove_identity_pairs(model)
    onnx.checker.check_model(out)
    assert removed == 1 and dq_q_pairs(out) == []
    assert [n.name for n in out.graph.node] == ["q1", "dq1", "dq2", "relu", "side"]  # dq1 still feeds "side"
    assert list(out.graph.node[2].input)[0] == "q1"
    x = np.linspace(-3, 12, 16, dtype=np.float32).reshape(2, 8)  # includes values that saturate
    for a, b in zip(_run(out, x), _run(model, x)):
        np.testing.assert_array_equal(a, b)
    assert float_islands(out) == {"Relu": 2}


def test_pair_with_two_scales_is_reported_and_kept():
    model = _chain(0.07)
    assert [p["same_scale"] for p in dq_q_pairs(model)] == [False]
    out, removed = remove_identity_pairs(model)
    assert removed == 0 and len(out.graph.node) == len(model.graph.node)


def test_audit_counts_what_onnxruntime_keeps():
    report = audit(_chain(0.07))
    assert report["saved"]["dq_q_pairs"] == 1 and report["saved"]["dq_q_pairs_same_scale"] == 0
    # two different scales: ONNX Runtime cannot fuse the round trip away, the Relu reads a DQ in float
    assert report["ort_cpu"]["dq_q_pairs"] == 1
    assert report["ort_cpu"]["float_islands"] == {"Relu": 2}


def test_shared_bias_gets_one_copy_per_quantized_reader():
    """Two Convs and an Add read one bias: after unsharing each reads its own equal copy, the rest is as it was."""
    b = numpy_helper.from_array(np.full(4, 0.5, np.float32), "b")
    w = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, 4, 1, 1], np.int64), "shape")
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c1"], name="c1"),
             helper.make_node("Conv", ["c1", "w", "b"], ["c2"], name="c2"),
             helper.make_node("Reshape", ["b", "shape"], ["b4"], name="r"),
             helper.make_node("Add", ["c2", "b4"], ["output"], name="add")]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 3, 3]) for n in ("input", "output")]
    model = helper.make_model(helper.make_graph(nodes, "shared", io[:1], io[1:], [b, w, shape]),
                              opset_imports=[helper.make_opsetid("", 17)])
    out, copies = unshare_initializers(model, ("Conv", "Add"))
    onnx.checker.check_model(out)
    assert copies == 3  # w once, b twice (its Reshape reader included); the int64 shape is left alone
    readers = [list(n.input) for n in out.graph.node]
    assert readers[0][1:] == ["w", "b"] and readers[1][1:] == ["w__unshared1", "b__unshared1"]
    assert readers[2] == ["b__unshared2", "shape"]
    x = np.random.default_rng(0).standard_normal((1, 4, 3, 3)).astype(np.float32)
    np.testing.assert_array_equal(_run(out, x)[0], _run(model, x)[0])
    assert unshare_initializers(model, ("MatMul",))[1] == 0  # no reader of those types: nothing copied


def _pool_graph(size: int, **pool):
    """input[1, 4, size, size] -> Q -> DQ -> AveragePool(**pool) -> Q -> DQ -> output (uint8, zero point 5)."""
    inits = [numpy_helper.from_array(np.array(0.03, np.float32), "s"),
             numpy_helper.from_array(np.array(0.02, np.float32), "s2"),
             numpy_helper.from_array(np.array(5, np.uint8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="dq"),
             helper.make_node("AveragePool", ["dq"], ["pooled"], name="pool", **pool),
             helper.make_node("QuantizeLinear", ["pooled", "s2", "z"], ["q2"], name="q2"),
             helper.make_node("DequantizeLinear", ["q2", "s2", "z"], ["output"], name="dq2")]
    graph = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, size, size])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_average_pool_between_qdq_becomes_an_int8_depthwise_conv():
    """Next-ViT's patch-embedding pool (2x2, stride 2, ceil mode, pads excluded) on a size it tiles: the same
    averages as a depthwise QLinearConv, and no QLinearAveragePool left for ONNX Runtime to pick."""
    model = _pool_graph(8, kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, count_include_pad=0)
    out, n = pools_as_convs(model)
    onnx.checker.check_model(out)
    assert n == 1 and [x.op_type for x in out.graph.node].count("AveragePool") == 0
    x = np.random.default_rng(0).uniform(-0.1, 7.0, (1, 4, 8, 8)).astype(np.float32)
    want, got = _run(model, x)[0], _run(out, x)[0]
    assert got.shape == (1, 4, 4, 4)
    assert np.abs(got - want).max() <= 0.02 + 1e-6  # at most one output quantization step apart (rounding)
    ops = audit(out)["ort_cpu"]["ops"]
    assert ops.get("QLinearConv") == 1 and "QLinearAveragePool" not in ops and "AveragePool" not in ops


def test_pools_that_differ_from_a_conv_are_left_alone():
    cases = [_pool_graph(7, kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, count_include_pad=0),  # partial window
             _pool_graph(8, kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])]  # padding
    for model in cases:
        assert pools_as_convs(model)[1] == 0
    floor = _pool_graph(7, kernel_shape=[2, 2], strides=[2, 2])  # floor mode drops the last row: still a conv
    out, n = pools_as_convs(floor)
    x = np.random.default_rng(1).uniform(0, 5, (1, 4, 7, 7)).astype(np.float32)
    assert n == 1 and np.abs(_run(out, x)[0] - _run(floor, x)[0]).max() <= 0.02 + 1e-6
