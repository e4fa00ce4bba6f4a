"""The FP16 overflow guard of the Core ML export: which MIL ops of an fp16 ML Program stay in fp32.

Core ML's ``compute_precision=FLOAT16`` makes a program fp16 end to end. Next-ViT's attention forms
``q @ k^T`` *before* the scale, so trained weights can push that product past fp16's 65504 (inf, then
NaN out of the softmax). The guard applies the TensorRT path's decision rules
(:mod:`.fp16`: :class:`~.fp16.Fp16Policy`, :func:`~.fp16.activation_risk`,
:func:`~.fp16.exp_input_risk`, :func:`~.fp16.weight_risk`) to the MIL program:

1. With calibration (``--calib-dir``/``--calib-images``): the model is converted once in fp32 to an
   in-memory MIL program, which :class:`~nextvit_deploy.backends.coreml_mil.MilEvaluator` runs on the
   calibration images recording every op output's |x| maximum and underflow fraction. An output that
   would overflow (or underflow) fp16 keeps its producer and its consumers in fp32; a softmax/exp whose
   input is large stays fp32. The same op names reach coremltools' fp16 pass (``add_fp16_cast`` runs
   after every fusion, and the fp32 conversion runs the same passes up to it).
2. Always (static rule): an op reading an fp32 constant that overflows fp16 or lies mostly below its
   normal range stays fp32 (biases of conv/linear excepted, as in the ONNX transform). This is decided
   in the op selector itself, on the op as the fp16 pass sees it.

The decision reaches coremltools as ``ct.transform.FP16ComputePrecision(op_selector=...)``; after saving,
the package's program is read back and every kept op is checked to compute in fp32.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DeployError
from .fp16 import EXP_LIKE_OPS, Fp16Policy, KeptNode, activation_risk, exp_input_risk, weight_risk
from .precision import FP16_MIN_NORMAL, Feeds, TensorRange, feed_batches, feed_count

if TYPE_CHECKING:  # pragma: no cover
    from . import ExportRequest

__all__ = ["MIL_EXP_LIKE_OPS", "CoreMLFp16Plan", "package_name", "measure_program", "choose_fp32_ops", "static_reason",
           "plan_coreml_fp16", "program_precision"]

# MIL spellings of the ONNX transform's exp-like ops (fp16.EXP_LIKE_OPS)
MIL_EXP_LIKE_OPS = {"softmax": "Softmax", "exp": "Exp"}
assert set(MIL_EXP_LIKE_OPS.values()) <= EXP_LIKE_OPS
# Const inputs added to an accumulator far larger than fp16's subnormal range (not weight-checked)
BIAS_INPUTS = {"conv": "bias", "linear": "bias", "conv_transpose": "bias"}
NOT_MEASURED = ("no activation ranges measured (no --calib-dir/--calib-images): static rules only, i.e. ops "
                "reading an fp32 constant that overflows fp16 or is mostly below its normal range stay fp32; "
                "pass --calib-images N (bundled photos) or --calib-dir DIR to measure")


def package_name(name: str, *, prefix: str = "op_") -> str:
    """The name an op (``prefix="op_"``) or a value (``"var_"``) gets in the saved package: coremltools'
    backend sanitizes names to ``[a-zA-Z_][a-zA-Z0-9_]*`` (its ``NameSanitizer``), e.g. ``537`` -> ``op_537``."""
    from coremltools.converters.mil.mil.passes.defs.preprocess import NameSanitizer

    return NameSanitizer(prefix=prefix).sanitize_name(name)


def _op_inputs(op) -> list:
    out: list = []
    for var in op.inputs.values():
        out.extend(var if isinstance(var, (list, tuple)) else [var])
    return out


def static_reason(op, policy: Fp16Policy) -> str | None:
    """Why ``op`` must stay fp32 from its constant inputs alone (:func:`~.fp16.weight_risk`), or None."""
    skip = BIAS_INPUTS.get(op.op_type)
    for pname, var in op.inputs.items():
        if pname == skip:
            continue
        for v in var if isinstance(var, (list, tuple)) else [var]:
            if v.op is None or v.op.op_type != "const" or not v.is_tensor_or_scalar_of(dtype="fp32"):
                continue
            val = v.val
            if val is None:
                continue
            why = weight_risk(package_name(v.name, prefix="var_"), np.asarray(val), policy)
            if why:
                return why
    return None


class _RangeAccumulator:
    """|x| maximum and fp16-underflow fraction of every float tensor an evaluator run produces."""

    def __init__(self) -> None:
        self.absmax: dict[str, float] = {}
        self.tiny: dict[str, int] = {}
        self.nonzero: dict[str, int] = {}

    def __call__(self, var, value) -> None:
        if not value.is_floating_point() or value.numel() == 0:
            return
        a = value.detach().abs().float().reshape(-1)
        name = var.name
        self.absmax[name] = max(self.absmax.get(name, 0.0), float(a.max()))
        nz = a[a > 0]
        self.nonzero[name] = self.nonzero.get(name, 0) + int(nz.numel())
        self.tiny[name] = self.tiny.get(name, 0) + int((nz < FP16_MIN_NORMAL).sum())

    def ranges(self) -> dict[str, TensorRange]:
        return {n: TensorRange(absmax=m, tiny_fraction=self.tiny[n] / self.nonzero[n] if self.nonzero[n] else 0.0)
                for n, m in self.absmax.items()}


def measure_program(program, feeds: Feeds, *, batch: int,
                    progress: Callable[[str], None] = lambda _m: None) -> dict[str, TensorRange]:
    """Run an fp32 MIL ``program`` on ``feeds`` with the MIL evaluator; return every op output's range.

    Args:
        program: the fp32 MIL ``Program`` (``ct.convert(..., convert_to="milinternal")``).
        feeds: float32 NCHW inputs in the program's input convention (an array or a stream).
        batch: the program's fixed batch (a short last run is topped up, see :func:`~.precision.feed_batches`).
        progress: one-line progress callback.

    Returns:
        MIL variable name -> :class:`~.precision.TensorRange`.
    """
    from ..backends.coreml_mil import MilEvaluator

    evaluator = MilEvaluator(program)
    inputs = list(evaluator.input_vars)
    if len(inputs) != 1:
        raise DeployError(f"internal: the fp16 guard expects one program input, got {inputs}")
    acc = _RangeAccumulator()
    total, done = feed_count(feeds), 0
    for chunk in feed_batches(feeds, batch, static=batch):
        evaluator.run({inputs[0]: chunk}, observe=acc)
        done = min(total, done + chunk.shape[0])
        progress(f"fp16 guard: measured activation ranges on {done}/{total} calibration images")
    return acc.ranges()


def choose_fp32_ops(program, ranges: dict[str, TensorRange], *, policy: Fp16Policy | None = None) -> list[KeptNode]:
    """The ops of ``program`` that must stay fp32 given measured ``ranges`` (the rules of :mod:`.fp16`;
    ``policy`` defaults to :class:`~.fp16.Fp16Policy` (), as on the TensorRT path).

    Returns:
        One :class:`~.fp16.KeptNode` (node = MIL op name) per kept op, in program order, first reason found.
    """
    policy = policy or Fp16Policy()
    ops = [op for op in program.functions["main"].operations if op.op_type != "const"]
    producers = {v.name: op for op in ops for v in op.outputs}
    consumers: dict[str, list] = {}
    for op in ops:
        for v in _op_inputs(op):
            consumers.setdefault(v.name, []).append(op)
    reasons: dict[str, str] = {}
    for name, r in ranges.items():
        why = activation_risk(package_name(name, prefix="var_"), r, policy)
        if why:
            for op in ([producers[name]] if name in producers else []) + consumers.get(name, []):
                reasons.setdefault(op.name, why)
    for op in ops:
        if op.op_type in MIL_EXP_LIKE_OPS and op.inputs.get("x") is not None and op.inputs["x"].name in ranges:
            why = exp_input_risk(MIL_EXP_LIKE_OPS[op.op_type], ranges[op.inputs["x"].name], policy)
            if why:
                reasons.setdefault(op.name, why)
        why = static_reason(op, policy)
        if why:
            reasons.setdefault(op.name, why)
    return [KeptNode(op.name, op.op_type, reasons[op.name]) for op in ops if op.name in reasons]


def program_precision(program) -> dict[str, dict[str, str]]:
    """op name -> {"op_type", "dtype"} (its first output's dtype) for the compute ops of a MIL program."""
    from coremltools.converters.mil.mil import types

    return {op.name: {"op_type": op.op_type, "dtype": types.builtin_to_string(op.outputs[0].dtype)}
            for op in program.functions["main"].operations if op.op_type not in ("const", "cast") and op.outputs}


@dataclass
class CoreMLFp16Plan:
    """The guard's decision for one export, and what coremltools' fp16 pass did with it.

    Attributes:
        planned: the ops kept from the fp32 program's activation ranges and constants (empty without calibration).
        policy: thresholds (shared with the ONNX/TensorRT transform).
        calibration: where the calibration images came from (``CalibrationSet.describe()``), or None.
        ranges_summary: largest activations and softmax inputs against their limits, or the not-measured note.
        static: ops the selector kept from their constants (filled in during conversion).
        seen: names of every op the fp16 pass asked about (filled in during conversion).
    """

    planned: list[KeptNode]
    policy: Fp16Policy
    calibration: dict[str, Any] | None
    ranges_summary: dict[str, Any]
    static: list[KeptNode] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    @property
    def kept(self) -> list[KeptNode]:
        """Every op kept in fp32, each once (planned reasons first)."""
        names = {k.node for k in self.planned}
        return [*self.planned, *(k for k in self.static if k.node not in names)]

    def compute_precision(self, ct):
        """``ct.transform.FP16ComputePrecision`` whose selector leaves the kept ops in fp32."""
        keep = {k.node for k in self.planned}

        def op_selector(op) -> bool:
            self.seen.add(op.name)
            if op.name in keep:
                return False
            why = static_reason(op, self.policy)
            if why:
                if all(k.node != op.name for k in self.static):
                    self.static.append(KeptNode(op.name, op.op_type, why))
                return False
            return True

        return ct.transform.FP16ComputePrecision(op_selector=op_selector)

    def details(self, saved_program, *, progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
        """The manifest record, checked against the saved package's program (``coreml_mil.load_program`` of the
        package, as the exporter has already read it back); each kept op is also reported to
        ``progress`` (one ``fp32 kept: ...`` line each, as the TensorRT path prints them).

        ``fp32_kept`` has the TensorRT keep-list's shape (``node``, ``op_type``, ``reason``; nodes named as in
        the package) and lists every compute op that runs in fp32: the guard's, plus any coremltools keeps by
        its own rules (it never offers such ops to the selector). ``fp32_not_applied`` lists guard decisions
        coremltools' fp16 pass never offered (ops it creates later); those run in fp16.

        Raises:
            DeployError: an op the selector kept computes in fp16 in the package.
        """
        ops = program_precision(saved_program)
        named = [(k, KeptNode(package_name(k.node), k.op_type, k.reason)) for k in self.kept]
        wrong = [pk.node for k, pk in named if k.node in self.seen and ops.get(pk.node, {}).get("dtype") == "fp16"]
        if wrong:
            raise DeployError(f"internal: the fp16 guard kept op(s) {wrong[:5]} in fp32 but the package computes "
                              "them in fp16")
        applied = [pk for k, pk in named if k.node in self.seen and pk.node in ops]
        not_applied = [pk for k, pk in named if k.node not in self.seen or pk.node not in ops]
        ours = {k.node for k in applied}
        by_coremltools = [KeptNode(name, o["op_type"], "kept in fp32 by coremltools' own fp16 rules (an fp32 "
                                   "constant beyond fp16's range, or an op it never converts)")
                          for name, o in ops.items() if o["dtype"] == "fp32" and name not in ours]
        kept = [*applied, *by_coremltools]
        for k in kept:
            progress(f"fp32 kept: {k.node} ({k.op_type}): {k.reason}")
        for k in not_applied:
            progress(f"fp16 guard could not keep {k.node} ({k.op_type}) in fp32: coremltools creates it after "
                     f"its fp16 pass ({k.reason})")
        dtypes = [o["dtype"] for o in ops.values()]
        return {"transform": "mixed-precision fp16 (coremltools FP16ComputePrecision op_selector; float32 I/O)",
                "ranges_measured": bool(self.calibration), "fp32_kept": [k.to_dict() for k in kept],
                "fp32_kept_count": len(kept), "fp32_not_applied": [k.to_dict() for k in not_applied],
                "fp16_ops": dtypes.count("fp16"), "fp32_ops": dtypes.count("fp32"),
                "policy": self.policy.to_dict(), "ranges": self.ranges_summary, "calibration": self.calibration}


def _summary(program, ranges: dict[str, TensorRange], policy: Fp16Policy) -> dict[str, Any]:
    largest = sorted(((r.absmax, n) for n, r in ranges.items() if np.isfinite(r.absmax)), reverse=True)[:5]
    exp_inputs = [ranges[op.inputs["x"].name].absmax for op in program.functions["main"].operations
                  if op.op_type in MIL_EXP_LIKE_OPS and op.inputs.get("x") is not None
                  and op.inputs["x"].name in ranges]
    return {"tensors_measured": len(ranges),
            "largest_activations": [{"tensor": package_name(n, prefix="var_"), "absmax": float(f"{a:.4g}")}
                                    for a, n in largest],
            "activation_limit": policy.activation_max,
            "largest_softmax_input": float(f"{max(exp_inputs):.4g}") if exp_inputs else None,
            "softmax_input_limit": policy.exp_input_max}


def plan_coreml_fp16(req: ExportRequest, convert_fp32: Callable[[], Any], *, progress: Callable[[str], None],
                     policy: Fp16Policy | None = None) -> CoreMLFp16Plan:
    """Decide the fp32 ops of a Core ML fp16 export (see the module docstring).

    Args:
        req: the request (``calib_dir``/``calib_images``/``calibrate_fp16`` choose whether to measure,
            ``input_kind``, ``image_size``, ``batch``, ``variant``).
        convert_fp32: returns the model converted in fp32 to an in-memory MIL program (called only
            when ranges are measured).
        progress: one-line progress callback.
        policy: thresholds. Defaults to :class:`~.fp16.Fp16Policy` (), as on the TensorRT path.
    """
    policy = policy or Fp16Policy()
    if req.calib_dir is None and not req.calibrate_fp16:
        progress("fp16 guard: " + NOT_MEASURED)
        return CoreMLFp16Plan(planned=[], policy=policy, calibration=None,
                              ranges_summary={"tensors_measured": 0, "note": NOT_MEASURED})
    from nextvit_model import resolve_variant

    from .precision import calibration_set

    cfg = resolve_variant(req.variant)
    progress(f"fp16 guard: loading calibration images ({req.calib_dir or 'bundled calibration photos'})")
    calib = calibration_set(image_size=req.image_size, calib_dir=req.calib_dir, calib_images=req.calib_images,
                            crop_pct=cfg.crop_pct, mean=cfg.mean, std=cfg.std, input_kind=req.input_kind)
    progress("fp16 guard: converting an fp32 program to measure")
    started = time.perf_counter()
    program = convert_fp32()
    ranges = measure_program(program, calib.feeds, batch=req.batch[1], progress=progress)
    summary = {**_summary(program, ranges, policy), "measure_seconds": round(time.perf_counter() - started, 1)}
    return CoreMLFp16Plan(planned=choose_fp32_ops(program, ranges, policy=policy), policy=policy,
                          calibration=calib.describe(), ranges_summary=summary)
