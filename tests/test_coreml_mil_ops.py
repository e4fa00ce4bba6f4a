"""The MIL evaluator, op by op, against PyTorch semantics.

Each case builds a one-op (or few-op) MIL program with coremltools' MIL builder, converts it with an
empty pass pipeline (so the op reaches the package as written), saves it as an ``.mlpackage``, loads
it back with :func:`load_program` and evaluates it. References are computed independently with
PyTorch (or numpy where PyTorch has no direct equivalent), never with the evaluator's own helpers, so a
bug in the evaluator cannot agree with itself.
"""
from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import requires

pytestmark = requires("coremltools")

ATOL = 1e-5


@pytest.fixture(scope="module")
def ct():
    from nextvit_deploy._deps import import_coremltools

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    return import_coremltools()


@pytest.fixture
def run_op(ct, tmp_path):
    """run_op(fn, **inputs) -> (outputs list, evaluator): fn(mb, *input_vars) returns the output var(s)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    from nextvit_deploy.backends.coreml_mil import MilEvaluator
    from nextvit_deploy.export.coreml import _quiet_conversion

    counter = itertools.count()

    def _run(fn, *, precision="fp32", accumulate="fp32", **inputs):
        names = list(inputs)
        specs = [mb.TensorSpec(shape=np.asarray(v).shape, dtype=types.fp32) for v in inputs.values()]

        # mb.program reads the argument names of the function it wraps
        src = f"def prog({', '.join(names)}):\n    return fn(mb, {', '.join(names)})\n"
        scope = {"fn": fn, "mb": mb}
        exec(src, scope)
        program = mb.program(input_specs=specs, opset_version=ct.target.iOS16)(scope["prog"])
        with _quiet_conversion():
            model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                               compute_precision=ct.precision.FLOAT32, skip_model_load=True,
                               pass_pipeline=ct.PassPipeline.EMPTY)
        path = tmp_path / f"op{next(counter)}.mlpackage"
        model.save(str(path))
        ev = MilEvaluator.from_package(path, accumulate=accumulate)
        out = ev.run({k: np.asarray(v, dtype=np.float32) for k, v in inputs.items()})
        return [out[n] for n in ev.output_names], ev

    return _run


def rnd(*shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def t(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


def close(got, want, atol=ATOL):
    want = want.numpy() if isinstance(want, torch.Tensor) else want
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, atol=atol, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# convolution
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups,stride,dilation", [(1, 1, 1), (3, 2, 1), (6, 1, 2)])
def test_conv2d_custom_asymmetric_padding(run_op, groups, stride, dilation):
    x, w, b = rnd(2, 6, 9, 11), rnd(12, 6 // groups, 3, 3, seed=1), rnd(12, seed=2)
    pad = [1, 0, 2, 1]  # top, bottom, left, right
    (y,), ev = run_op(lambda mb, x: mb.conv(x=x, weight=w, bias=b, strides=[stride, stride], pad_type="custom",
                                            pad=pad, dilations=[dilation, dilation], groups=groups), x=x)
    want = F.conv2d(F.pad(t(x), (2, 1, 1, 0)), t(w), t(b), stride=stride, dilation=dilation, groups=groups)
    close(y, want)
    assert ev.op_counts()["conv"] == 1


@pytest.mark.parametrize("pad_type", ["same", "same_lower", "valid"])
def test_conv2d_pad_types(run_op, pad_type):
    x, w = rnd(1, 4, 8, 7), rnd(5, 4, 4, 3, seed=1)  # even kernel height: same vs same_lower differ
    (y,), _ = run_op(lambda mb, x: mb.conv(x=x, weight=w, strides=[2, 2], pad_type=pad_type), x=x)
    if pad_type == "valid":
        want = F.conv2d(t(x), t(w), stride=2)
    else:
        # TF-style SAME: output ceil(in / stride); total pad (out-1)*s + k - in, extra cell after
        # ("same") or before ("same_lower")
        def split(n, k, s):
            total = max(0, (-(-n // s) - 1) * s + k - n)
            lo, hi = total // 2, total - total // 2
            return (lo, hi) if pad_type == "same" else (hi, lo)
        (top, bottom), (left, right) = split(8, 4, 2), split(7, 3, 2)
        want = F.conv2d(F.pad(t(x), (left, right, top, bottom)), t(w), stride=2)
    close(y, want)


def test_conv1d(run_op):
    x, w, b = rnd(2, 4, 20), rnd(6, 2, 5, seed=1), rnd(6, seed=2)
    (y,), _ = run_op(lambda mb, x: mb.conv(x=x, weight=w, bias=b, strides=[3], pad_type="custom", pad=[2, 1],
                                           groups=2), x=x)
    close(y, F.conv1d(F.pad(t(x), (2, 1)), t(w), t(b), stride=3, groups=2))


# ---------------------------------------------------------------------------------------------------
# average pooling: 1-D and 2-D, ceil mode with and without counting padding, explicit paddings
# ---------------------------------------------------------------------------------------------------
def _coreml_avg_pool2d(x: np.ndarray, k: int, s: int, pad: int, *, exclude: bool) -> np.ndarray:
    """Independent numpy reference for Core ML's ceil-mode average pool (apple/coremltools#2772).

    Output size: MIL's ceil rule (a last window that starts inside the right padding is dropped).
    Divisor: the input cells under the window when padding is excluded; otherwise the whole window,
    k * k, *including* cells a ceil-mode window hangs past the explicit padding (Core ML counts them,
    PyTorch does not; the report shows Core ML's values).
    """
    n, c, h, w = x.shape

    def out_size(size: int) -> int:
        o = -(-(size + 2 * pad - k) // s) + 1
        return o - 1 if (o - 1) * s >= size + pad and pad > 0 else o

    oh, ow = out_size(h), out_size(w)
    y = np.zeros((n, c, oh, ow), dtype=np.float64)
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * s - pad, j * s - pad
            rows = slice(max(r0, 0), min(r0 + k, h))
            cols = slice(max(c0, 0), min(c0 + k, w))
            total = x[:, :, rows, cols].astype(np.float64).sum(axis=(2, 3))
            cells = (rows.stop - rows.start) * (cols.stop - cols.start)
            y[:, :, i, j] = total / (cells if exclude else k * k)
    return y


@pytest.mark.parametrize("exclude", [True, False])
@pytest.mark.parametrize("size,pad", [((7, 9), 0), ((7, 9), 1), ((13, 13), 0), ((5, 6), 1)])
def test_avg_pool2d_ceil_mode(run_op, exclude, size, pad):
    x = rnd(2, 3, *size, scale=3.0)
    (y,), _ = run_op(lambda mb, x: mb.avg_pool(x=x, kernel_sizes=[2, 2], strides=[2, 2], pad_type="custom",
                                               pad=[pad] * 4, ceil_mode=True, exclude_padding_from_average=exclude),
                     x=x)
    close(y, _coreml_avg_pool2d(x, 2, 2, pad, exclude=exclude))
    torch_rule = F.avg_pool2d(t(x), 2, 2, padding=pad, ceil_mode=True, count_include_pad=not exclude).numpy()
    overhang = any((o - 1) * 2 + 2 > n + 2 * pad for o, n in zip(np.asarray(y).shape[2:], size))
    if exclude or not overhang:  # the rules agree (Next-ViT's case: count_include_pad=False)
        close(y, torch_rule)
    else:  # coremltools#2772: Core ML divides the overhanging windows by k*k, PyTorch by fewer cells
        assert not np.allclose(np.asarray(y), torch_rule, atol=1e-4)


def test_avg_pool2d_ceil_mode_kernel3(run_op):
    x = rnd(1, 2, 10, 11)
    for exclude in (True, False):
        def pool(mb, x, exclude=exclude):
            return mb.avg_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1],
                               ceil_mode=True, exclude_padding_from_average=exclude)

        (y,), _ = run_op(pool, x=x)
        close(y, _coreml_avg_pool2d(x, 3, 2, 1, exclude=exclude))


@pytest.mark.parametrize("length,kernel,ceil", [(50, 16, False), (49, 4, False), (49, 4, True), (64, 64, False)])
def test_avg_pool1d(run_op, length, kernel, ceil):
    """Next-ViT's spatial reduction: AvgPool1d over the flattened token sequence (floor truncation)."""
    x = rnd(2, 8, length)
    (y,), _ = run_op(lambda mb, x: mb.avg_pool(x=x, kernel_sizes=[kernel], strides=[kernel], pad_type="valid",
                                               ceil_mode=ceil), x=x)
    # exclude_padding_from_average defaults to False: Core ML divides a ceil-mode window hanging past
    # the end by the full kernel (apple/coremltools#2772), i.e. the overhang counts as zeros
    over = (-(-length // kernel)) * kernel - length if ceil else 0
    close(y, F.avg_pool1d(F.pad(t(x), (0, over)), kernel, kernel))


@pytest.mark.parametrize("exclude", [True, False])
def test_avg_pool2d_explicit_asymmetric_padding(run_op, exclude):
    """pad = [top, bottom, left, right] = [0, 1, 2, 1]; zeros counted unless excluded (numpy reference)."""
    x = rnd(1, 2, 6, 7)
    (y,), _ = run_op(lambda mb, x: mb.avg_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="custom",
                                               pad=[0, 1, 2, 1], exclude_padding_from_average=exclude), x=x)
    xp = np.pad(x, ((0, 0), (0, 0), (0, 1), (2, 1)))
    ones = np.pad(np.ones((6, 7)), ((0, 1), (2, 1)))
    oh, ow = (7 - 3) // 2 + 1, (10 - 3) // 2 + 1
    want = np.zeros((1, 2, oh, ow), np.float32)
    for i in range(oh):
        for j in range(ow):
            win = xp[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            count = ones[2 * i:2 * i + 3, 2 * j:2 * j + 3].sum() if exclude else 9.0
            want[:, :, i, j] = win.sum(axis=(2, 3)) / count
    close(y, want)


def test_avg_pool_same_padding(run_op):
    x = rnd(1, 3, 7, 8)
    (y,), _ = run_op(lambda mb, x: mb.avg_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="same",
                                               exclude_padding_from_average=True), x=x)
    # same: out = ceil(in/2): H 7 -> total pad 2 -> (1, 1); W 8 -> total pad 1 -> (0, 1)
    xp = F.pad(t(x), (0, 1, 1, 1))
    mask = F.pad(torch.ones(1, 1, 7, 8), (0, 1, 1, 1))
    want = F.avg_pool2d(xp, 3, 2) / F.avg_pool2d(mask, 3, 2)
    close(y, want)


# ---------------------------------------------------------------------------------------------------
# elementwise, broadcasting
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,ref", [("add", torch.add), ("sub", torch.sub), ("mul", torch.mul),
                                    ("real_div", torch.true_divide)])
@pytest.mark.parametrize("yshape", [(2, 3, 4, 5), (3, 1, 1), (1, 5), ()])
def test_binary_broadcasting(run_op, op, ref, yshape):
    x = rnd(2, 3, 4, 5)
    y = rnd(*yshape, seed=1) + (3.0 if op == "real_div" else 0.0)
    if yshape == ():  # rank-0 program inputs are not allowed: a scalar arrives as a constant
        (out,), _ = run_op(lambda mb, x: getattr(mb, op)(x=x, y=np.float32(y)), x=x)
    else:
        (out,), _ = run_op(lambda mb, x, y: getattr(mb, op)(x=x, y=y), x=x, y=y)
    close(out, ref(t(x), t(y)))


def test_binary_with_constant_operand_first(run_op):
    x, c = rnd(2, 3), rnd(3, seed=1)
    (out,), _ = run_op(lambda mb, x: mb.sub(x=c, y=x), x=x)
    close(out, t(c) - t(x))


def test_relu(run_op):
    x = rnd(3, 7)
    (y,), _ = run_op(lambda mb, x: mb.relu(x=x), x=x)
    close(y, torch.relu(t(x)))
    assert (y == 0).any() and (y > 0).any()


# ---------------------------------------------------------------------------------------------------
# layout: transpose, reshape, concat
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("perm", [[0, 2, 1, 3], [0, 2, -1, -3], [-1, -2, -3, -4], [3, 0, -2, 1]])
def test_transpose_negative_permutations(run_op, perm):
    x = rnd(2, 3, 4, 5)
    (y,), _ = run_op(lambda mb, x: mb.transpose(x=x, perm=perm), x=x)
    close(y, t(x).permute(*[p % 4 for p in perm]))


@pytest.mark.parametrize("shape,want", [([2, -1, 5], (2, 12, 5)), ([0, 3, 0, 5], (2, 3, 4, 5)),
                                        ([-1], (120,)), ([2, 6, 10], (2, 6, 10))])
def test_reshape(run_op, shape, want):
    x = rnd(2, 3, 4, 5)
    (y,), _ = run_op(lambda mb, x: mb.reshape(x=x, shape=shape), x=x)
    close(y, t(x).reshape(want))


@pytest.mark.parametrize("axis", [1, -1, -3])
def test_concat(run_op, axis):
    a, b = rnd(2, 3, 4), rnd(2, 3, 4, seed=1)
    (y,), _ = run_op(lambda mb, a, b: mb.concat(values=[a, b, a], axis=axis), a=a, b=b)
    close(y, torch.cat([t(a), t(b), t(a)], dim=axis))


# ---------------------------------------------------------------------------------------------------
# linear algebra
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear(run_op, with_bias):
    x, w, b = rnd(2, 7, 6), rnd(4, 6, seed=1), rnd(4, seed=2)
    kwargs = {"bias": b} if with_bias else {}
    (y,), _ = run_op(lambda mb, x: mb.linear(x=x, weight=w, **kwargs), x=x)
    close(y, F.linear(t(x), t(w), t(b) if with_bias else None))


@pytest.mark.parametrize("tx,ty", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_transpose_flags(run_op, tx, ty):
    xs = (2, 3, 6, 4) if tx else (2, 3, 4, 6)
    ys = (2, 3, 5, 6) if ty else (2, 3, 6, 5)
    x, y = rnd(*xs), rnd(*ys, seed=1)
    (out,), _ = run_op(lambda mb, x, y: mb.matmul(x=x, y=y, transpose_x=tx, transpose_y=ty), x=x, y=y)
    a = t(x).transpose(-1, -2) if tx else t(x)
    b = t(y).transpose(-1, -2) if ty else t(y)
    close(out, a @ b)


def test_matmul_broadcasting(run_op):
    x, y = rnd(2, 1, 4, 5), rnd(3, 5, 6, seed=1)
    (out,), _ = run_op(lambda mb, x, y: mb.matmul(x=x, y=y), x=x, y=y)
    close(out, torch.matmul(t(x), t(y)))  # batch dims (2, 1) and (3,) broadcast to (2, 3)


def test_matmul_rank1_is_refused(run_op):
    """coremltools declares (1, 6) for a (5,) x (3, 5, 6) matmul where numpy gives (3, 6): refuse, don't guess."""
    from nextvit_deploy.backends.coreml_mil import UnsupportedMilOp

    with pytest.raises(UnsupportedMilOp, match="rank-1 operand"):
        run_op(lambda mb, v, y: mb.matmul(x=v, y=y), v=rnd(5), y=rnd(3, 5, 6, seed=1))


# ---------------------------------------------------------------------------------------------------
# softmax, reductions, normalisation, casts
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [-1, 1, -3])
def test_softmax(run_op, axis):
    x = rnd(2, 3, 4, 5, scale=4.0)
    (y,), _ = run_op(lambda mb, x: mb.softmax(x=x, axis=axis), x=x)
    close(y, torch.softmax(t(x), dim=axis))


@pytest.mark.parametrize("axes,keep", [([2, 3], False), ([-1, -2], True), ([1], False), (None, False)])
def test_reduce_mean(run_op, axes, keep):
    x = rnd(2, 3, 4, 5)
    kwargs = {"axes": axes} if axes is not None else {}
    (y,), _ = run_op(lambda mb, x: mb.reduce_mean(x=x, keep_dims=keep, **kwargs), x=x)
    want = t(x).mean(dim=axes, keepdim=keep) if axes is not None else t(x).mean()
    close(y, want)


def test_batch_norm(run_op):
    x = rnd(2, 4, 3, 3)
    mean, var = rnd(4, seed=1), np.abs(rnd(4, seed=2)) + 0.5
    gamma, beta = rnd(4, seed=3), rnd(4, seed=4)
    (y,), _ = run_op(lambda mb, x: mb.batch_norm(x=x, mean=mean, variance=var, gamma=gamma, beta=beta,
                                                 epsilon=1e-3), x=x)
    want = F.batch_norm(t(x), t(mean), t(var), t(gamma), t(beta), training=False, eps=1e-3)
    close(y, want)


def test_fp16_values_are_rounded_to_fp16(run_op):
    """fp32 -> fp16 cast, fp16 ops, fp16 -> fp32 cast: every intermediate is an fp16 value."""
    x, w = rnd(1, 3, 8, 8), rnd(4, 3, 3, 3, seed=1)
    w16 = w.astype(np.float16)

    def build(mb, x):
        h = mb.cast(x=x, dtype="fp16")
        h = mb.conv(x=h, weight=w16, pad_type="valid")
        h = mb.mul(x=h, y=np.float16(1.0 / 3.0))
        h = mb.softmax(x=h, axis=1)
        return mb.cast(x=h, dtype="fp32")

    (y,), ev = run_op(build, x=x)
    step = F.conv2d(t(x).half().float(), torch.from_numpy(w16).float()).half().float()
    step = (step * torch.tensor(1.0 / 3.0).half().float()).half().float()
    want = torch.softmax(step, dim=1).half().float()
    np.testing.assert_array_equal(y, want.numpy())  # bit-exact: same fp32 math, same fp16 rounding points
    exact = torch.softmax(F.conv2d(t(x), t(w)) / 3.0, dim=1).numpy()
    assert np.abs(y - exact).max() > 1e-5  # and the rounding really happened
    assert ev.op_counts()["cast"] == 2


# ---------------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------------
def test_unsupported_op_is_refused_by_name(run_op):
    from nextvit_deploy.backends.coreml_mil import UnsupportedMilOp

    with pytest.raises(UnsupportedMilOp, match=r"sigmoid \(x1\)"):
        run_op(lambda mb, x: mb.add(x=mb.sigmoid(x=x), y=x), x=rnd(2, 3))


def test_unsupported_parameter_is_refused(run_op):
    from nextvit_deploy.backends.coreml_mil import UnsupportedMilOp

    with pytest.raises(UnsupportedMilOp, match="interleave=True"):
        run_op(lambda mb, a: mb.concat(values=[a, a], axis=1, interleave=True), a=rnd(2, 3))


def test_every_supported_op_has_a_test():
    from nextvit_deploy.backends.coreml_mil import SUPPORTED_OPS

    source = open(__file__).read()
    tested_elsewhere = {"classify": "tests/test_coreml_export.py (classifier with a labels file)"}
    for op in SUPPORTED_OPS:
        assert op in tested_elsewhere or f"mb.{op}(" in source or f'"{op}"' in source, f"no test builds {op}"


# ---------------------------------------------------------------------------------------------------
# accumulate="fp16": linear/matmul reductions keep an fp16 running sum over blocks of FP16_BLOCK terms
# ---------------------------------------------------------------------------------------------------
def _fp16_running_linear(x: np.ndarray, w: np.ndarray, block: int) -> np.ndarray:
    """numpy reference: per block an exact (float64) partial sum, rounded to fp16, added to an fp16 total."""
    x64, w64 = x.astype(np.float16).astype(np.float64), w.astype(np.float16).astype(np.float64)
    acc = np.zeros((x.shape[0], w.shape[0]), dtype=np.float16)
    for k in range(0, x.shape[1], block):
        part = (x64[:, k:k + block] @ w64[:, k:k + block].T).astype(np.float16)
        acc = (acc.astype(np.float32) + part.astype(np.float32)).astype(np.float16)
    return acc.astype(np.float32)


def test_linear_fp16_accumulation(run_op):
    from nextvit_deploy.backends.coreml_mil import FP16_BLOCK

    x, w = rnd(4, 512, scale=4.0), rnd(8, 512, seed=1)

    def fn(mb, x):
        y = mb.linear(x=mb.cast(x=x, dtype="fp16"), weight=w.astype(np.float16))
        return mb.cast(x=y, dtype="fp32")

    (harsh,), _ = run_op(fn, accumulate="fp16", x=x)
    (kind,), _ = run_op(fn, accumulate="fp32", x=x)
    want = _fp16_running_linear(x, w, FP16_BLOCK)
    np.testing.assert_allclose(harsh, want, rtol=0, atol=np.abs(want).max() * 2 ** -10)  # one fp16 ulp
    exact = (x.astype(np.float16).astype(np.float64) @ w.astype(np.float16).astype(np.float64).T)
    assert np.abs(harsh - exact).max() > np.abs(kind - exact).max()  # the fp16 running sum is the harsher bound


# ---------------------------------------------------------------------------------------------------
# flexible-shape plumbing: a program whose height and width both vary rebuilds reshape targets with
# shape -> gather -> concat (of rank-0 values) -> reshape (export --image-sizes)
# ---------------------------------------------------------------------------------------------------
def test_shape_gather_concat_rebuild_a_reshape_target(run_op):
    x = rnd(2, 3, 4, 5)

    def prog(mb, x):
        dims = mb.shape(x=x)
        flat = mb.reshape(x=x, shape=[2, 3, -1])
        target = mb.concat(values=[mb.gather(x=dims, indices=i, axis=0) for i in (0, 1, 2, 3)], axis=0)
        return mb.reshape(x=mb.mul(x=flat, y=2.0), shape=target), dims

    (y, dims), ev = run_op(prog, x=x)
    assert {"shape": 1, "gather": 4, "concat": 1}.items() <= ev.op_counts().items()  # ops, not folded constants
    assert dims.dtype == np.int32 and dims.tolist() == [2, 3, 4, 5]
    close(y, t(x) * 2.0)


@pytest.mark.parametrize("indices,axis", [(np.array([2, 0, -1], np.int32), 1), (np.array([[1, 0], [0, 1]], np.int32), 0),
                                          (-2, 2)])
def test_gather(run_op, indices, axis):
    x = rnd(2, 3, 4)
    (y,), _ = run_op(lambda mb, x: mb.gather(x=x, indices=indices, axis=axis), x=x)
    close(y, np.take(x, indices, axis=axis))
