"""Core ML parity without a Mac: evaluate a saved package's ML Program (MIL) op by op.

Core ML's runtime exists only on macOS, but a saved ``.mlpackage`` can be loaded back into its MIL
``Program`` on any OS (``coremltools.converters.mil.frontend.milproto.load``). That program is a short
list of well-defined operations; :class:`MilEvaluator` computes them one at a time with PyTorch on the
CPU, following the MIL op definitions of coremltools 9.0 (``mil/ops/defs/iOS15..iOS18``).

Precision model: every op computes in float32 and its result is stored in the dtype the program
declares for it, so every fp16-typed value is rounded to fp16 (round-to-nearest-even), exactly as an
fp16 program stores it. What this cannot reproduce is how a particular Core ML device accumulates
*inside* an op (the Neural Engine and GPU may accumulate in fp16); it models fp16 storage with fp32
accumulation. An fp32 program is evaluated in fp32 throughout.

Compressed weights (``constexpr_*`` ops of int8 / palettized packages, :data:`CONSTEXPR_OPS`) are
expanded to dense tensors once, when the program loads (``backends/coreml_mil_constexpr.py``).

Only the op types Next-ViT packages contain are implemented (:data:`SUPPORTED_OPS`); any other op,
or a parameter value outside what is implemented, is refused up front with :class:`UnsupportedMilOp`
naming it, never approximated. ``tests/test_coreml_mil_ops.py`` checks each op against PyTorch.
"""
from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ArtifactError, BadInput, DeployError
from .base import Runner, TensorSpec
from .coreml_mil_constexpr import CONSTEXPR_OPS, decompress

ACCUMULATE = ("fp32", "fp16")
__all__ = ["ACCUMULATE", "SUPPORTED_OPS", "CONSTEXPR_OPS", "UnsupportedMilOp", "ClassScores", "MilEvaluator", "MilRunner",
           "load_program", "enumerated_input_shapes"]


class UnsupportedMilOp(DeployError):
    """The ML Program uses an op (or an op parameter) the MIL evaluator does not implement."""


@dataclass(frozen=True)
class ClassScores:
    """Value of a ``classify`` op's dictionary output: one score per class label, in label order."""

    classes: tuple
    scores: np.ndarray  # shape (num_classes,), float32

    def as_dict(self) -> dict:
        return {c: float(s) for c, s in zip(self.classes, self.scores)}


# MIL dtype name (coremltools types.builtin_to_string) -> torch dtype used to store the value
_TORCH_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64, "int8": torch.int8,
                 "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
                 "bool": torch.bool}


def load_program(path: str | Path):
    """Load a saved ``.mlpackage`` back into its MIL ``Program`` (works on Linux).

    Raises:
        ArtifactError: the path is not a readable ML Program package.
    """
    from .._deps import import_coremltools

    ct = import_coremltools(purpose="reading Core ML packages")
    from coremltools.converters.mil.frontend.milproto.load import load

    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"Core ML package {p} does not exist: check the path or export it first")
    try:
        model = ct.models.MLModel(str(p), skip_model_load=True)
        spec = model.get_spec()
    except Exception as exc:  # coremltools raises plain Exceptions for unreadable packages
        raise ArtifactError(f"{p} is not a readable Core ML package ({type(exc).__name__}): re-export it") from None
    if spec.WhichOneof("Type") != "mlProgram":
        raise ArtifactError(f"{p} holds a {spec.WhichOneof('Type')} model, not an ML Program: "
                            "re-export with nextvit-deploy export --target coreml")
    return load(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)


def enumerated_input_shapes(path: str | Path) -> dict[str, list[tuple[int, ...]]]:
    """Input name -> the shapes a package's ``EnumeratedShapes`` input accepts (only such inputs are listed).

    An image input lists (height, width) sizes; they are returned as full NCHW shapes like a tensor's.
    """
    from .._deps import import_coremltools

    ct = import_coremltools(purpose="reading Core ML packages")
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    found: dict[str, list[tuple[int, ...]]] = {}
    for inp in spec.description.input:
        kind = inp.type.WhichOneof("Type")
        if kind == "multiArrayType" and inp.type.multiArrayType.WhichOneof("ShapeFlexibility") == "enumeratedShapes":
            found[inp.name] = [tuple(int(d) for d in s.shape) for s in inp.type.multiArrayType.enumeratedShapes.shapes]
        elif kind == "imageType" and inp.type.imageType.WhichOneof("SizeFlexibility") == "enumeratedSizes":
            found[inp.name] = [(1, 3, int(s.height), int(s.width)) for s in inp.type.imageType.enumeratedSizes.sizes]
    return found


def _dtype_name(var) -> str | None:
    from coremltools.converters.mil.mil import types

    try:
        return types.builtin_to_string(var.dtype)
    except Exception:
        return None


# --------------------------------------------------------------------------------------------------
# Op arguments
# --------------------------------------------------------------------------------------------------
class _Args:
    """An op's inputs as the handlers see them: tensors (float32 for compute) and constant parameters."""

    def __init__(self, op, env: Mapping[str, Any], *, fp16: bool = False):
        self.op = op
        self.env = env
        self.fp16 = fp16  # accumulate="fp16": fp16 values stay fp16 while computing

    def has(self, name: str) -> bool:
        return self.op.inputs.get(name) is not None

    def raw(self, name: str) -> Any:
        var = self.op.inputs[name]
        if isinstance(var, (list, tuple)):
            return [self.env[v.name] for v in var]
        return self.env[var.name]

    @overload
    def tensor(self, name: str) -> torch.Tensor: ...

    @overload
    def tensor(self, name: str, *, optional: bool) -> torch.Tensor | None: ...

    def tensor(self, name: str, *, optional: bool = False) -> torch.Tensor | None:
        """Input ``name`` as a tensor, floating types widened to float32 for computing."""
        if not self.has(name):
            if optional:
                return None
            raise DeployError(f"internal: MIL op {self.op.op_type} '{self.op.name}' has no input {name!r}")
        return _compute_form(self.raw(name), fp16=self.fp16)

    def tensors(self, name: str) -> list[torch.Tensor]:
        return [_compute_form(v, fp16=self.fp16) for v in self.raw(name)]

    def const(self, name: str, default: Any = None) -> Any:
        """A parameter as a Python/numpy value (``default`` when the op does not set it)."""
        if not self.has(name):
            return default
        var = self.op.inputs[name]
        if var.val is not None:
            val = var.val
        else:
            val = self.env[var.name]
            val = val.numpy() if isinstance(val, torch.Tensor) else val
        if isinstance(val, np.ndarray):
            return val.tolist() if val.ndim else val.item()
        if isinstance(val, np.generic):
            return val.item()
        return val

    def refuse(self, what: str) -> None:
        raise UnsupportedMilOp(f"MIL op {self.op.op_type} '{self.op.name}' uses {what}, which the MIL evaluator "
                               "does not implement: verify this package on macOS with Core ML instead")


def _compute_form(value: Any, *, fp16: bool = False) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(np.asarray(value))
    if fp16 and value.dtype == torch.float16:
        return value
    return value.float() if value.is_floating_point() else value


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# --------------------------------------------------------------------------------------------------
# Padding / output-size rules shared by conv and pooling (MIL: pad_type valid|same|same_lower|custom)
# --------------------------------------------------------------------------------------------------
def _pads(args: _Args, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
          dilations: Sequence[int]) -> list[tuple[int, int]]:
    pad_type = str(args.const("pad_type", "valid")).lower()
    nd = len(spatial)
    if pad_type == "valid":
        return [(0, 0)] * nd
    if pad_type == "custom":
        pad = args.const("pad", [0] * 2 * nd)
        if len(pad) != 2 * nd:
            args.refuse(f"pad={pad} (expected {2 * nd} values)")
        return [(int(pad[2 * i]), int(pad[2 * i + 1])) for i in range(nd)]
    if pad_type in ("same", "same_lower"):
        out = []
        for i, k, s, d in zip(spatial, kernel, strides, dilations):
            eff = (k - 1) * d + 1
            total = max(0, (math.ceil(i / s) - 1) * s + eff - i)
            small, big = total // 2, total - total // 2
            out.append((small, big) if pad_type == "same" else (big, small))
        return out
    args.refuse(f"pad_type={pad_type!r}")
    return []


def _torch_pad(pairs: Sequence[tuple[int, int]]) -> list[int]:
    """[(before, after) per spatial dim] -> F.pad's last-dimension-first flat list."""
    flat: list[int] = []
    for before, after in reversed(pairs):
        flat += [before, after]
    return flat


# --------------------------------------------------------------------------------------------------
# Op handlers: (args) -> tensor | tuple of outputs
# --------------------------------------------------------------------------------------------------
def _conv(a: _Args) -> torch.Tensor:
    x, w, b = a.tensor("x"), a.tensor("weight"), a.tensor("bias", optional=True)
    nd = x.dim() - 2
    if nd not in (1, 2, 3):
        a.refuse(f"{nd} spatial dimensions")
    strides = list(a.const("strides", [1] * nd))
    dilations = list(a.const("dilations", [1] * nd))
    groups = int(a.const("groups", 1))
    pads = _pads(a, x.shape[2:], w.shape[2:], strides, dilations)
    x = F.pad(x, _torch_pad(pads))
    fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    if not a.fp16 or x.dtype != torch.float16 or groups != 1:
        return fn(x, w, b, stride=strides, padding=0, dilation=dilations, groups=groups)
    # accumulate="fp16": input-channel blocks summed with an fp16 running sum (groups=1 convs only;
    # grouped/depthwise convs reduce over few terms and are computed as one block)
    x, w = x.float(), w.float()
    parts = [fn(x[:, k], w[:, k], None, stride=strides, padding=0, dilation=dilations)
             for k in _blocks(x.shape[1])]
    if b is not None:
        parts.append(b.float().reshape(1, -1, *[1] * nd).expand_as(parts[0]))
    return _fp16_sum(parts)


def _pool_out(size: int, before: int, after: int, k: int, s: int, ceil_mode: bool) -> int:
    """MIL's output-size rule (mil/ops/defs/_utils.py spatial_dimensions_out_shape)."""
    padded = size + before + after
    if not ceil_mode:
        return (padded - k) // s + 1
    out = (padded - k + s - 1) // s + 1
    if (out - 1) * s >= size + before and (before > 0 or after > 0):
        out -= 1
    return out


def _avg_pool(a: _Args) -> torch.Tensor:
    """Average pooling, 1-D/2-D/3-D, with Core ML's divisor. With ``exclude_padding_from_average`` it
    counts the input cells under the window. Without it, Core ML divides by the whole window, counting
    explicit padding *and* the cells a ceil-mode window hangs past it (apple/coremltools#2772); PyTorch's
    ``count_include_pad=True`` leaves the overhang out, so the two disagree there and this follows Core ML."""
    x = a.tensor("x")
    kernel = list(a.const("kernel_sizes"))
    nd = len(kernel)
    if x.dim() != nd + 2 or nd not in (1, 2, 3):
        a.refuse(f"kernel_sizes={kernel} on a rank-{x.dim()} input")
    strides = list(a.const("strides", [1] * nd))
    ceil_mode = bool(a.const("ceil_mode", False))
    exclude = bool(a.const("exclude_padding_from_average", False))
    spatial = list(x.shape[2:])
    pads = _pads(a, spatial, kernel, strides, [1] * nd)
    outs, extra = [], []
    for size, (lo, hi), k, s in zip(spatial, pads, kernel, strides):
        o = _pool_out(size, lo, hi, k, s, ceil_mode)
        outs.append(o)
        extra.append(max(0, (o - 1) * s + k - (size + lo + hi)))
    # window sums over input + explicit padding + ceil overhang (all zeros outside the input)
    full = [(lo, hi + e) for (lo, hi), e in zip(pads, extra)]
    xp = F.pad(x, _torch_pad(full))
    counted = torch.ones([1, 1, *spatial], dtype=x.dtype)
    if exclude:
        counted = F.pad(counted, _torch_pad(full))
    else:  # Core ML: explicit padding and the ceil overhang both count (coremltools#2772)
        counted = F.pad(counted, _torch_pad(full), value=1.0)
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    mean_full = pool(xp, kernel, strides, padding=0, ceil_mode=False, count_include_pad=True)
    frac = pool(counted, kernel, strides, padding=0, ceil_mode=False, count_include_pad=True)
    window = float(np.prod(kernel))
    index = (slice(None), slice(None), *[slice(0, o) for o in outs])
    mean_full, frac = mean_full[index], frac[index]
    # sum / count == mean_full * window / (frac * window); full windows divide by exactly 1
    return mean_full / frac.clamp_min(1.0 / window)


def _relu(a: _Args) -> torch.Tensor:
    return torch.relu(a.tensor("x"))


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[_Args], torch.Tensor]:
    def handler(a: _Args) -> torch.Tensor:
        return fn(a.tensor("x"), a.tensor("y"))

    return handler


def _real_div(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.true_divide(x, y)


def _transpose(a: _Args) -> torch.Tensor:
    x = a.tensor("x")
    perm = [_axis(int(p), x.dim()) for p in a.const("perm")]
    if sorted(perm) != list(range(x.dim())):
        a.refuse(f"perm={a.const('perm')} for a rank-{x.dim()} input")
    return x.permute(*perm)


def _reshape(a: _Args) -> torch.Tensor:
    x = a.tensor("x")
    shape = [int(s) for s in a.const("shape")]
    if 0 in shape:
        if len(shape) != x.dim():
            a.refuse(f"shape={shape} (0 is only defined when the rank is kept)")
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


FP16_BLOCK = 32  # accumulate="fp16": reduction length summed in fp32 before each fp16-rounded running sum


def _fp16_sum(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Running sum of partial results with the accumulator rounded to fp16 after every add."""
    acc = parts[0].to(torch.float16)
    for p in parts[1:]:
        acc = (acc.float() + p.to(torch.float16).float()).to(torch.float16)
    return acc


def _blocks(n: int) -> list[slice]:
    return [slice(i, min(i + FP16_BLOCK, n)) for i in range(0, n, FP16_BLOCK)]


def _linear(a: _Args) -> torch.Tensor:
    x, w, b = a.tensor("x"), a.tensor("weight"), a.tensor("bias", optional=True)
    if not a.fp16 or x.dtype != torch.float16:
        return F.linear(x, w, b)
    x, w = x.float(), w.float()
    parts = [F.linear(x[..., k], w[:, k]) for k in _blocks(x.shape[-1])]
    if b is not None:
        parts.append(b.float().expand_as(parts[0]))
    return _fp16_sum(parts)


def _matmul(a: _Args) -> torch.Tensor:
    x, y = a.tensor("x"), a.tensor("y")
    if x.dim() < 2 or y.dim() < 2:
        # coremltools' type inference and numpy disagree on rank-1 operands; Next-ViT has none
        a.refuse(f"a rank-{min(x.dim(), y.dim())} operand")
    if bool(a.const("transpose_x", False)):
        x = x.transpose(-1, -2)
    if bool(a.const("transpose_y", False)):
        y = y.transpose(-1, -2)
    if not a.fp16 or x.dtype != torch.float16:
        return torch.matmul(x, y)
    x, y = x.float(), y.float()
    return _fp16_sum([torch.matmul(x[..., k], y[..., k, :]) for k in _blocks(x.shape[-1])])


def _softmax(a: _Args) -> torch.Tensor:
    x = a.tensor("x")
    return torch.softmax(x, dim=_axis(int(a.const("axis", -1)), x.dim()))


def _concat(a: _Args) -> torch.Tensor:
    if bool(a.const("interleave", False)):
        a.refuse("interleave=True")
    values = a.tensors("values")
    if all(v.dim() == 0 for v in values):  # MIL: rank-0 values join as length-1 pieces into a rank-1 result
        return torch.stack(values)
    return torch.cat(values, dim=_axis(int(a.const("axis")), values[0].dim()))


def _shape(a: _Args) -> torch.Tensor:
    """The input's shape as an int32 vector (flexible-shape programs rebuild reshape targets from it)."""
    return torch.tensor(list(a.tensor("x").shape), dtype=torch.int32)


def _gather(a: _Args) -> torch.Tensor:
    """``numpy.take(x, indices, axis)``: indices of any rank (a scalar drops the axis), negative ones from the end."""
    x, idx = a.tensor("x"), a.tensor("indices")
    if int(a.const("batch_dims", 0)) != 0:
        a.refuse(f"batch_dims={a.const('batch_dims')}")
    if idx.is_floating_point():
        a.refuse("float indices")
    axis = _axis(int(a.const("axis", 0)), x.dim())
    n = x.shape[axis]
    idx = idx.long()
    if bool(((idx < -n) | (idx >= n)).any()):
        a.refuse(f"indices {idx.tolist()} outside [-{n}, {n})")
    idx = torch.where(idx < 0, idx + n, idx)
    picked = x.index_select(axis, idx.reshape(-1))
    return picked.reshape([*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]])


def _cast(a: _Args) -> torch.Tensor:
    dtype = str(a.const("dtype"))
    if dtype not in _TORCH_DTYPES:
        a.refuse(f"dtype={dtype!r}")
    x = a.tensor("x")
    if x.is_floating_point() and not _TORCH_DTYPES[dtype].is_floating_point and dtype != "bool":
        a.refuse(f"a float -> {dtype} cast (rounding rule not pinned down)")
    return x.to(_TORCH_DTYPES[dtype])


def _reduce_mean(a: _Args) -> torch.Tensor:
    x = a.tensor("x")
    axes = a.const("axes", None)
    keep = bool(a.const("keep_dims", False))
    if axes is None:
        return x.mean().reshape([1] * x.dim()) if keep else x.mean()
    axes = [axes] if isinstance(axes, int) else list(axes)
    return x.mean(dim=[_axis(int(d), x.dim()) for d in axes], keepdim=keep)


def _batch_norm(a: _Args) -> torch.Tensor:
    x = a.tensor("x")
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean, var = a.tensor("mean").reshape(shape), a.tensor("variance").reshape(shape)
    gamma = a.tensor("gamma", optional=True)
    beta = a.tensor("beta", optional=True)
    eps = float(a.const("epsilon", 1e-5))
    out = (x - mean) / torch.sqrt(var + eps)
    if gamma is not None:
        out = out * gamma.reshape(shape)
    if beta is not None:
        out = out + beta.reshape(shape)
    return out


def _classify(a: _Args) -> tuple[str, ClassScores]:
    probs = a.tensor("probabilities").reshape(-1)
    classes = tuple(a.const("classes"))
    if len(classes) != probs.numel():
        a.refuse(f"{len(classes)} classes for {probs.numel()} scores")
    scores = probs.to(torch.float32).numpy().copy()
    return classes[int(np.argmax(scores))], ClassScores(classes, scores)


SUPPORTED_OPS: dict[str, Callable[[_Args], Any]] = {
    "conv": _conv,
    "avg_pool": _avg_pool,
    "relu": _relu,
    "add": _binary(torch.add),
    "sub": _binary(torch.sub),
    "mul": _binary(torch.mul),
    "real_div": _binary(_real_div),
    "transpose": _transpose,
    "reshape": _reshape,
    "linear": _linear,
    "matmul": _matmul,
    "softmax": _softmax,
    "concat": _concat,
    "shape": _shape,
    "gather": _gather,
    "cast": _cast,
    "reduce_mean": _reduce_mean,
    "batch_norm": _batch_norm,
    "classify": _classify,
}
"""MIL op type -> handler. ``const`` is handled by the loader. Everything else is refused."""


# --------------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------------
class MilEvaluator:
    """Evaluate one function of a MIL ``Program`` op by op.

    Args:
        program: a ``coremltools`` MIL Program (see :func:`load_program`).
        function: which function to run. Defaults to ``"main"``.
        accumulate: ``"fp32"`` (fp16 values are widened to fp32 for each op and the result is rounded
            back to fp16: the kinder bound) or ``"fp16"`` (the harsher bound, nearer Core ML's fp16
            GPU/Neural Engine arithmetic: fp16 values stay fp16 in every op, and the reductions of
            ``linear``, ``matmul`` and ungrouped ``conv`` keep an fp16 running sum over blocks of
            :data:`FP16_BLOCK` terms; not a bit-exact model of any Core ML device). fp32 programs are
            unaffected. Defaults to ``"fp32"``.

    Raises:
        UnsupportedMilOp: the function uses op types outside :data:`SUPPORTED_OPS` (all are named).
    """

    def __init__(self, program, *, function: str = "main", accumulate: str = "fp32",
                 allowed_shapes: Mapping[str, Sequence[tuple[int, ...]]] | None = None):
        if accumulate not in ACCUMULATE:
            raise BadInput(f"unknown accumulation {accumulate!r}: choose one of {', '.join(ACCUMULATE)} with --accumulate")
        self.accumulate = accumulate
        if function not in program.functions:
            raise ArtifactError(f"the ML Program has no function {function!r} (it has {sorted(program.functions)})")
        func = program.functions[function]
        self.ops = list(func.operations)
        unknown = Counter(op.op_type for op in self.ops if op.op_type != "const" and op.op_type not in SUPPORTED_OPS
                          and op.op_type not in CONSTEXPR_OPS)
        if unknown:
            listed = ", ".join(f"{t} (x{n})" for t, n in sorted(unknown.items()))
            raise UnsupportedMilOp(f"the ML Program uses op(s) the MIL evaluator does not implement: {listed}; "
                                   "verify this package on macOS with Core ML, or add them to "
                                   "nextvit_deploy/backends/coreml_mil.py with a test")
        self.input_vars = dict(func.inputs)
        # inputs with symbolic dimensions (a package's EnumeratedShapes): the shapes Core ML accepts
        self.allowed_shapes = {k: [tuple(s) for s in v] for k, v in (allowed_shapes or {}).items()}
        self.output_names = [v.name for v in func.outputs]
        self.consts: dict[str, Any] = {}
        for op in self.ops:
            if op.op_type == "const":
                var = op.outputs[0]
                self.consts[var.name] = _const_value(var)
            elif op.op_type in CONSTEXPR_OPS:  # compressed weight: expanded once, stored in its declared dtype
                dense = decompress(op, _Args(op, {}).refuse)
                self.consts[op.outputs[0].name] = _store(torch.from_numpy(np.ascontiguousarray(dense)), op.outputs[0])
        feeds_only_constexpr = {v.name for op in self.ops if op.op_type in CONSTEXPR_OPS for v in op.inputs.values()}
        feeds_only_constexpr -= {v.name for op in self.ops if op.op_type not in CONSTEXPR_OPS
                                 for var in op.inputs.values() for v in (var if isinstance(var, (list, tuple)) else [var])}
        for name in feeds_only_constexpr - {v.name for v in func.outputs}:  # compressed form: not needed once expanded
            self.consts.pop(name, None)
        self._last_use = self._liveness(func)

    @classmethod
    def from_package(cls, path: str | Path, *, function: str = "main", accumulate: str = "fp32") -> MilEvaluator:
        program = load_program(path)
        return cls(program, function=function, accumulate=accumulate, allowed_shapes=enumerated_input_shapes(path))

    def op_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(op.op_type for op in self.ops).items()))

    def input_specs(self) -> list[TensorSpec]:
        return [TensorSpec(name, "float32", _declared(var.shape)) for name, var in self.input_vars.items()]

    def _liveness(self, func) -> dict[str, int]:
        last: dict[str, int] = {}
        for i, op in enumerate(self.ops):
            for var in op.inputs.values():
                for v in var if isinstance(var, (list, tuple)) else [var]:
                    last[v.name] = i
        for v in func.outputs:
            last[v.name] = len(self.ops)
        return last

    def run(self, feed: Mapping[str, np.ndarray], *,
            observe: Callable[[Any, torch.Tensor], None] | None = None) -> dict[str, Any]:
        """Run the program on ``feed`` (input name -> array of the declared shape).

        Args:
            feed: input name -> array.
            observe: called as ``observe(var, value)`` with every tensor an op produces, as stored
                (what the Core ML fp16 guard measures activation ranges with). Defaults to none.

        Returns output name -> numpy array in the declared dtype (a ``classify`` op's outputs are a
        label string and :class:`ClassScores`).
        """
        env: dict[str, Any] = dict(self.consts)
        for name, var in self.input_vars.items():
            if name not in feed:
                raise DeployError(f"internal: no value for program input {name!r}")
            arr = np.asarray(feed[name])
            want = _declared(var.shape)
            if len(arr.shape) != len(want) or any(d is not None and d != a for d, a in zip(want, arr.shape)):
                raise DeployError(f"internal: program input {name!r} is {want}, got {arr.shape}")
            allowed = self.allowed_shapes.get(name)
            if None in want and allowed is not None and tuple(arr.shape) not in allowed:
                listed = ", ".join("x".join(map(str, s)) for s in allowed)
                raise BadInput(f"input {name!r} is {'x'.join(map(str, arr.shape))} but the package takes only {listed}: "
                               "resize the input, or re-export with --image-sizes listing this size")
            if None in want and allowed is None:
                raise DeployError(f"internal: program input {name!r} has flexible dimensions {want} but no list of "
                                  "the shapes it accepts")
            env[name] = _store(torch.from_numpy(np.ascontiguousarray(arr)), var)
        with torch.inference_mode():
            for i, op in enumerate(self.ops):
                if op.op_type == "const" or op.op_type in CONSTEXPR_OPS:
                    continue
                result = SUPPORTED_OPS[op.op_type](_Args(op, env, fp16=self.accumulate == "fp16"))
                results = result if isinstance(result, tuple) else (result,)
                if len(results) != len(op.outputs):
                    raise DeployError(f"internal: MIL op {op.op_type} '{op.name}' gave {len(results)} outputs, "
                                      f"expected {len(op.outputs)}")
                for var, value in zip(op.outputs, results):
                    env[var.name] = _store(value, var) if isinstance(value, torch.Tensor) else value
                    if observe is not None and isinstance(value, torch.Tensor):
                        observe(var, env[var.name])
                for var in op.inputs.values():  # free what no later op reads
                    for v in var if isinstance(var, (list, tuple)) else [var]:
                        if self._last_use.get(v.name, -1) <= i and v.name not in self.consts:
                            env.pop(v.name, None)
        out = {}
        for name in self.output_names:
            value = env[name]
            out[name] = value.numpy() if isinstance(value, torch.Tensor) else value
        return out


def _declared(shape) -> tuple[int | None, ...]:
    """A MIL input's shape with symbolic dimensions (``is0``, from flexible input shapes) as None."""
    return tuple(int(d) if isinstance(d, (int, np.integer)) else None for d in shape)


def _const_value(var) -> Any:
    val = var.val
    if isinstance(val, (np.ndarray, np.generic)) and val.dtype.kind in "fiub":
        return torch.from_numpy(np.array(val))
    if isinstance(val, (bool, int, float)) and not isinstance(val, str):
        return torch.tensor(val)
    return val  # strings, lists of labels, ...


def _store(value: torch.Tensor, var) -> torch.Tensor:
    """Store ``value`` in the dtype the program declares for ``var`` (fp16 values are rounded to fp16)."""
    name = _dtype_name(var)
    dtype = _TORCH_DTYPES.get(name or "")
    if dtype is None:
        raise DeployError(f"internal: value {var.name!r} has MIL type {name!r}")
    shape = var.shape
    if shape is not None and all(isinstance(d, (int, np.integer)) for d in shape):
        if tuple(value.shape) != tuple(int(d) for d in shape):
            raise DeployError(f"internal: MIL evaluator computed {var.name!r} with shape {tuple(value.shape)}, "
                              f"the program declares {tuple(shape)}")
    return value.to(dtype)


# --------------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------------
class MilRunner(Runner):
    """Run a Core ML package's ML Program with :class:`MilEvaluator` (any OS; what ``verify`` uses off macOS).

    Args:
        path: the ``.mlpackage``.
        output_map: artifact output name -> program output name. Defaults to identity on the program's
            outputs. A classifier's ``logits`` come from the ``classLabel_probs`` score dictionary.
        input_name: the artifact's input name. Defaults to ``"input"``.
    """

    device = f"MIL evaluator (numpy/PyTorch CPU on {sys.platform}, fp16 values rounded per op; not Core ML)"

    def __init__(self, path: str | Path, *, output_map: Mapping[str, str] | None = None,
                 input_name: str = "input", accumulate: str = "fp32"):
        super().__init__()
        if accumulate not in ACCUMULATE:
            raise BadInput(f"unknown accumulation {accumulate!r}: choose one of {', '.join(ACCUMULATE)} with --accumulate")
        self.accumulate = accumulate
        self.device = f"{MilRunner.device}, accumulate={accumulate}"
        self.path = Path(path)
        self.output_map: dict[str, str] = dict(output_map) if output_map else {}  # {}: the program's outputs
        self.input_name = input_name
        self.name = f"MilRunner({self.path.name})"
        self.evaluator: MilEvaluator | None = None

    @property
    def _program(self) -> MilEvaluator:
        if self.evaluator is None:
            raise DeployError(f"internal: {self.name} used outside its `with` block")
        return self.evaluator

    def _activate_impl(self) -> None:
        self.evaluator = MilEvaluator.from_package(self.path, accumulate=self.accumulate)
        if not self.output_map:
            self.output_map = {n: n for n in self.evaluator.output_names}
        missing = [v for v in self.output_map.values() if v not in self.evaluator.output_names]
        if missing:
            raise ArtifactError(f"{self.path.name} has no output(s) {missing} (it has "
                                f"{self.evaluator.output_names}): re-export it")
        names = list(self.evaluator.input_vars)
        if names != [self.input_name]:
            raise ArtifactError(f"{self.path.name} takes inputs {names}, expected [{self.input_name!r}]: re-export it")

    def _deactivate_impl(self) -> None:
        self.evaluator = None

    def _inputs_impl(self) -> list[TensorSpec]:
        return self._program.input_specs()

    def _infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raw = self._program.run({self.input_name: feed[self.input_name]})
        out = {}
        for name, program_name in self.output_map.items():
            value = raw[program_name]
            if isinstance(value, ClassScores):
                value = value.scores.reshape(1, -1)
            out[name] = np.asarray(value, dtype=np.float32)
        return out
