"""Compressed Core ML weights (issue #15, item 4): int8 (``--precision int8``) and palettized (``--palettize-bits``).

Op tests: each compressed-weight op the MIL evaluator expands (backends/coreml_mil_constexpr.py) against a
reference written here from the op's documented formula (plain Python integers for the bit packing), and
against coremltools' own ``decompress``. End to end: small packages (depths (1, 1, 5, 1) at 64x64) exported,
read back, every compressed weight expanded like coremltools does, and ``verify`` on the MIL evaluator.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_checks import assert_user_error

from conftest import SMALL_DEPTHS, requires

pytestmark = requires("coremltools")

RNG = np.random.default_rng(15)


# ---------------------------------------------------------------------------------------------------
# References written from the MIL op documentation (coremltools 9.0 mil/ops/defs/iOS16, iOS18)
# ---------------------------------------------------------------------------------------------------
def pack_reference(values: list[int], nbits: int) -> np.ndarray:
    """Fields packed from the least significant bit of byte 0 upward, as one Python integer."""
    acc = 0
    for i, v in enumerate(values):
        acc |= int(v) << (i * nbits)
    n = -(-len(values) * nbits // 8)
    return np.frombuffer(acc.to_bytes(n, "little"), dtype=np.uint8).copy()


def test_unpack_matches_the_documented_two_bit_example():
    from nextvit_deploy.backends.coreml_mil_constexpr import unpack_lsb_first

    # The docstring's example: n_bits=2, shape (5,): byte 0 = | 01 10 11 00 | (i3 i2 i1 i0), byte 1 = | xx xx xx 11 |
    packed = np.array([0b01101100, 0b11111111], dtype=np.uint8)  # the x bits set: they must be ignored
    assert unpack_lsb_first(packed, 2, 5).tolist() == [0, 3, 2, 1, 3]


@pytest.mark.parametrize("nbits", [1, 2, 4, 6, 8])
def test_unpack_against_integer_packing(nbits):
    from nextvit_deploy.backends.coreml_mil_constexpr import unpack_lsb_first

    values = RNG.integers(0, 2 ** nbits, size=37).tolist()  # 37 fields: 6-bit ones straddle bytes
    assert unpack_lsb_first(pack_reference(values, nbits), nbits, len(values)).tolist() == values


@pytest.mark.parametrize("nbits", [1, 2, 4, 6, 8])
def test_lut_to_dense_ios16_against_reference_and_coremltools(nbits):
    from coremltools.converters.mil.mil.ops.defs.iOS16.constexpr_ops import constexpr_lut_to_dense

    from nextvit_deploy.backends.coreml_mil_constexpr import lut_to_dense_packed

    shape = (6, 5, 3)
    idx = RNG.integers(0, 2 ** nbits, size=int(np.prod(shape)))
    lut = RNG.standard_normal(2 ** nbits).astype(np.float16)
    packed = pack_reference(idx.tolist(), nbits)
    want = np.array([float(lut[i]) for i in idx], dtype=np.float32).reshape(shape)  # lut[index], row-major
    got = lut_to_dense_packed(packed, lut, np.array(shape, dtype=np.uint32))
    np.testing.assert_array_equal(got, want)
    theirs = constexpr_lut_to_dense.decompress(lut, packed, np.array(shape, dtype=np.uint32))
    np.testing.assert_array_equal(got.astype(np.float16), theirs)


def test_affine_dequantize_against_formula_and_coremltools():
    from coremltools.converters.mil.mil.ops.defs.iOS16.constexpr_ops import constexpr_affine_dequantize

    from nextvit_deploy.backends.coreml_mil_constexpr import affine_dequantize

    q = RNG.integers(-128, 128, size=(4, 3, 2, 2)).astype(np.int8)
    for axis in (0, 1, -1 + 4):
        n = q.shape[axis]
        scale = (RNG.random(n) * 0.1 + 1e-3).astype(np.float16)
        zp = RNG.integers(-5, 5, size=n).astype(np.int8)
        want = np.empty(q.shape, dtype=np.float32)
        for index in np.ndindex(q.shape):  # element by element: scale[c] * (q - zero_point[c]), c = index[axis]
            c = index[axis]
            want[index] = np.float32(scale[c]) * (np.float32(q[index]) - np.float32(zp[c]))
        got = affine_dequantize(q, zp, scale, axis)
        np.testing.assert_array_equal(got, want)
        theirs = constexpr_affine_dequantize.decompress(q, zp, scale, axis)
        np.testing.assert_array_equal(got.astype(np.float16), theirs)
    # scalar scale and zero point
    np.testing.assert_array_equal(affine_dequantize(q, np.int8(3), np.float32(0.5), 0),
                                  0.5 * (q.astype(np.float32) - 3))


@pytest.mark.parametrize("with_offset", [False, True])
def test_blockwise_shift_scale_against_formula_and_coremltools(with_offset):
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import constexpr_blockwise_shift_scale

    from nextvit_deploy.backends.coreml_mil_constexpr import blockwise_shift_scale

    data = RNG.integers(-128, 128, size=(6, 8)).astype(np.int8)
    scale = (RNG.random((3, 2)) * 0.1 + 1e-3).astype(np.float16)  # blocks of 2 x 4
    offset = RNG.integers(-4, 4, size=(3, 2)).astype(np.int8) if with_offset else None
    want = np.empty(data.shape, dtype=np.float32)
    for i, j in np.ndindex(data.shape):  # output[i, j] = scale[i0, j0] * (data[i, j] - offset[i0, j0])
        i0, j0 = i // 2, j // 4
        off = np.float32(offset[i0, j0]) if offset is not None else np.float32(0)
        want[i, j] = np.float32(scale[i0, j0]) * (np.float32(data[i, j]) - off)
    got = blockwise_shift_scale(data, scale, offset)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got.astype(np.float16), constexpr_blockwise_shift_scale.decompress(data, scale, offset))


def test_lut_to_dense_ios18_per_block_tables():
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import constexpr_lut_to_dense

    from nextvit_deploy.backends.coreml_mil_constexpr import lut_to_dense_blocked

    idx = RNG.integers(0, 4, size=(6, 2)).astype(np.uint8)
    lut = RNG.standard_normal((2, 1, 4, 1)).astype(np.float16)  # two tables over axis 0 (rows 0-2, 3-5)
    want = np.array([[float(lut[i // 3, 0, idx[i, j], 0]) for j in range(2)] for i in range(6)], dtype=np.float32)
    got = lut_to_dense_blocked(idx, lut)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got.astype(np.float16), constexpr_lut_to_dense.decompress(idx, lut, None))


# ---------------------------------------------------------------------------------------------------
# The evaluator: compressed weights in a program, unknown constexpr ops refused
# ---------------------------------------------------------------------------------------------------
def _program(build, opset):
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 8), dtype=types.fp32)],
                opset_version=getattr(ct.target, opset))
    def prog(x):
        return mb.linear(x=x, weight=build(mb))

    return prog


def test_evaluator_runs_a_linear_with_int8_weights():
    from nextvit_deploy.backends.coreml_mil import MilEvaluator

    q = RNG.integers(-127, 128, size=(5, 8)).astype(np.int8)
    scale = (RNG.random(5) * 0.05 + 0.01).astype(np.float32)
    zp = np.zeros(5, dtype=np.int8)
    prog = _program(lambda mb: mb.constexpr_affine_dequantize(quantized_data=q, zero_point=zp, scale=scale, axis=0),
                    "iOS16")
    ev = MilEvaluator(prog)
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    (out,) = ev.run({"x": x}).values()
    w = scale[:, None] * q.astype(np.float32)
    np.testing.assert_allclose(out, x @ w.T, rtol=1e-5, atol=1e-5)
    assert ev.op_counts()["constexpr_affine_dequantize"] == 1


def test_evaluator_refuses_sparse_and_vector_palettized_weights():
    from nextvit_deploy.backends.coreml_mil import MilEvaluator, UnsupportedMilOp

    mask = (RNG.random(40) > 0.5).astype(np.uint8)
    bits = np.packbits(mask, bitorder="little")
    dense = _program(lambda mb: mb.constexpr_sparse_to_dense(
        nonzero_data=RNG.standard_normal(int(mask.sum())).astype(np.float32), mask=bits,
        shape=np.array([5, 8], dtype=np.uint32)), "iOS16")
    with pytest.raises(UnsupportedMilOp, match=r"constexpr_sparse_to_dense \(x1\)"):
        MilEvaluator(dense)
    from coremltools.converters.mil.mil import types

    vec = _program(lambda mb: mb.constexpr_lut_to_dense(
        indices=RNG.integers(0, 2, size=(5, 4)).astype(types.np_uint1_dtype),
        lut=RNG.standard_normal((1, 1, 2, 2)).astype(np.float32), vector_axis=1), "iOS18")
    with pytest.raises(UnsupportedMilOp, match="vector palettization"):
        MilEvaluator(vec)


# ---------------------------------------------------------------------------------------------------
# Export end to end (small model at 64x64; each export converts twice, dense and compressed)
# ---------------------------------------------------------------------------------------------------
def _export(out: Path, **kw):
    from nextvit_deploy.export import ExportRequest, export

    base = dict(target="coreml", variant="nextvit_small", out_dir=out, depths=SMALL_DEPTHS, seed=1, image_size=(64, 64))
    base.update(kw)
    return export(ExportRequest(**base))


def _expanded_like_coremltools(path: Path) -> int:
    """Every compressed weight of the package, expanded by the evaluator, equals coremltools' expansion."""
    from nextvit_deploy.backends.coreml_mil import MilEvaluator, load_program

    prog = load_program(path)
    ev = MilEvaluator(prog)
    n = 0
    for op in prog.functions["main"].operations:
        if op.op_type.startswith("constexpr_"):
            theirs = op.materialized_val_inference()
            mine = ev.consts[op.outputs[0].name].numpy()
            assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
            np.testing.assert_array_equal(mine, theirs)
            n += 1
    return n


def _check(art, *, mode: str, ops: str, ratio: tuple[float, float]):
    from nextvit_deploy._deps import import_coremltools
    from nextvit_deploy.artifact import Artifact
    from nextvit_deploy.verify import verify

    loaded = Artifact.load(art.path)
    rec = loaded.details["weight_compression"]
    assert rec["mode"] == mode and set(rec["ops"]) == {ops}
    assert rec["compressed_tensors"] == loaded.details["op_counts"][ops] > 0
    assert ratio[0] < rec["package_bytes"] / rec["package_bytes_dense"] < ratio[1]
    assert _expanded_like_coremltools(art.path) == rec["compressed_tensors"]
    meta = import_coremltools().models.MLModel(str(art.path), skip_model_load=True).user_defined_metadata
    assert meta["nextvit.weight_compression"].startswith(mode)
    report = verify(art.path)
    assert report and "MIL evaluator" in report.candidate_device
    assert report.tolerance.source.startswith("Core ML")
    return report


@pytest.mark.slow  # two conversions + verify: ~15 s on 2 idle cores
def test_int8_export_verifies(tmp_path):
    art = _export(tmp_path, precision="int8")
    assert art.path.name == "nextvit_small-coreml-int8-64.mlpackage" and art.precision == "int8"
    assert art.details["compute_precision"] == "fp16" and art.details["minimum_deployment_target"] == "iOS16"
    # int8 values + one fp16 scale per output channel: about half the fp16 package
    _check(art, mode="linear_symmetric", ops="constexpr_affine_dequantize", ratio=(0.45, 0.56))


@pytest.mark.slow
def test_palettized_export_verifies_beside_the_dense_one(tmp_path):
    art = _export(tmp_path, precision="fp16", palettize_bits=4)
    assert art.path.name == "nextvit_small-coreml-fp16-64-pal4.mlpackage" and art.precision == "fp16"
    report = _check(art, mode="kmeans", ops="constexpr_lut_to_dense", ratio=(0.2, 0.3))
    assert report.tolerance.min_cosine < 0.98  # 4-bit palettes: the looser, documented row


@pytest.mark.slow
@pytest.mark.parametrize("kw,ops", [
    (dict(precision="int8", input_kind="image", labels=True), "constexpr_blockwise_shift_scale"),
    (dict(precision="fp16", palettize_bits=8), "constexpr_lut_to_dense"),
])
def test_ios18_compressed_ops_verify(tmp_path, kw, ops):
    if kw.pop("labels", False):  # an image classifier (classLabel + probabilities) with compressed weights
        labels = tmp_path / "labels.txt"
        labels.write_text("".join(f"class_{i:04d}\n" for i in range(1000)))
        kw["class_labels"] = labels
    art = _export(tmp_path, min_deployment_target="iOS18", **kw)
    mode = "linear_symmetric" if kw["precision"] == "int8" else "kmeans"
    _check(art, mode=mode, ops=ops, ratio=(0.45, 0.56))


# ---------------------------------------------------------------------------------------------------
# Errors: one line naming the fix, nothing written
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,pattern", [
    (["--target", "onnx", "--palettize-bits", "4"], r"--palettize-bits applies only to --target coreml, not onnx"),
    (["--target", "coreml", "--palettize-bits", "3"], r"--palettize-bits must be one of 4, 6, 8, got 3"),
    (["--target", "coreml", "--precision", "int8", "--palettize-bits", "4"],
     r"pass --precision fp16 with --palettize-bits, or drop --palettize-bits"),
    (["--target", "coreml", "--precision", "int8", "--min-target", "iOS15"],
     r"--precision int8 stores compressed weights, which need iOS16/macOS13 or newer.*--min-target iOS16"),
    (["--target", "coreml", "--precision", "int8", "--calib-dir", "."], r"--calib-dir applies only to .*coreml"),
])
def test_cli_refuses_with_one_line(tmp_path, args, pattern):

    from typer.testing import CliRunner

    from nextvit_deploy.cli import app

    out = tmp_path / "out"
    assert_user_error(CliRunner().invoke(app, ["export", *args, "--image-size", "64", "--out", str(out)]), pattern, out)


def test_api_refuses_palettize_bits_off_coreml(tmp_path):
    from nextvit_deploy.errors import BadInput
    from nextvit_deploy.export import ExportRequest, validate_request

    with pytest.raises(BadInput, match="--palettize-bits applies only to --target coreml"):
        validate_request(ExportRequest(target="onnx", palettize_bits=4, out_dir=tmp_path))


def test_manifest_record_is_json_and_names_the_sizes(tmp_path):
    from nextvit_deploy.export.coreml_compress import WeightCompression, compression_record, size_line

    rec = compression_record(WeightCompression("kmeans", 6, "per_tensor", "fp16"), dense_bytes=4_000_000,
                             compressed_bytes=1_500_000, op_counts={"constexpr_lut_to_dense": 3, "conv": 3})
    assert json.loads(json.dumps(rec)) == rec and rec["size_ratio"] == 0.375 and rec["compressed_tensors"] == 3
    assert size_line(rec) == ("weights 6-bit palette (kmeans, per_tensor): package 4.0 MB -> 1.5 MB "
                              "(38% of the fp16 package)")
