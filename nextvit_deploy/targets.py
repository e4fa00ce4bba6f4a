"""One table of export targets (ultralytics' ``export_formats`` idea): suffix, precisions, host needs,
exporter and runner. CLI choices, file names and precision checks all come from here; a new runtime is
one backend module plus one row.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import BadInput

__all__ = ["Target", "TARGETS", "PRECISIONS", "get_target", "check_precision", "load_object", "artifact_name"]

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Target:
    name: str
    suffix: str  # of the artifact `export` writes
    precisions: tuple[str, ...]
    host: str  # what the machine needs to build/run it, shown by `doctor` and in errors
    exporter: str  # "module:function" taking an ExportRequest, returning an Artifact
    runner: str  # "module:function" taking an Artifact (+ keyword options), returning a Runner
    description: str


TARGETS: dict[str, Target] = {
    "onnx": Target("onnx", ".onnx", ("fp32", "fp16", "int8"), "onnxruntime (any OS)",
                   "nextvit_deploy.export.onnx:export_onnx", "nextvit_deploy.backends.onnxrt:runner_for_artifact",
                   "ONNX graph of the deploy form; int8 is ONNX Runtime's x86 QDQ convention"),
    "trt": Target("trt", ".engine", ("fp32", "fp16", "int8"), "tensorrt + NVIDIA GPU",
                  "nextvit_deploy.export.trt:export_trt", "nextvit_deploy.backends.tensorrt:runner_for_artifact",
                  "TensorRT engine built from a TensorRT-ready ONNX (precision in the graph)"),
    "coreml": Target("coreml", ".mlpackage", ("fp32", "fp16", "int8"), "coremltools (convert anywhere; run on macOS)",
                     "nextvit_deploy.export.coreml:export_coreml", "nextvit_deploy.backends.coreml:runner_for_artifact",
                     "Core ML ML Program package; int8 is int8 weights (per channel) on an fp16 program"),
}


def get_target(name: str) -> Target:
    if name in TARGETS:
        return TARGETS[name]
    close = difflib.get_close_matches(name, TARGETS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise BadInput(f"unknown target {name!r}{hint}: choose one of {', '.join(TARGETS)}")


def check_precision(target: str, precision: str) -> Target:
    t = get_target(target)
    if precision not in t.precisions:
        raise BadInput(f"precision {precision} is not supported for target {target}: "
                       f"choose one of {', '.join(t.precisions)}")
    return t


def runner_for(artifact: Any, **options: Any) -> Any:
    """The Runner for ``artifact`` (not yet activated): its target's runner, except that a TensorRT-ready
    ``.onnx`` (a ``trt`` artifact written where TensorRT is absent) runs on ONNX Runtime, the graph being
    plain ONNX. ``options`` (``threads``, ``providers``, ``device``, ``compute_units``, ...) go to the
    runner factory, each to the factories that take it; None values are dropped."""
    spec = get_target(artifact.target).runner
    if artifact.target == "trt" and Path(artifact.path).suffix == ".onnx":
        spec = TARGETS["onnx"].runner
    factory = load_object(spec)
    params = inspect.signature(factory).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return factory(artifact, **{k: v for k, v in options.items() if v is not None and (takes_all or k in params)})


def load_object(spec: str) -> Callable:
    """Import ``"package.module:attr"`` lazily (targets import their heavy dependencies only when used)."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def artifact_name(variant: str, target: str, precision: str, height: int, width: int, *,
                  features_only: bool = False, suffix: str | None = None,
                  sizes: tuple[tuple[int, int], ...] | None = None) -> str:
    """MMDeploy-style name: ``nextvit_small-onnx-fp32-224.onnx`` (``256x320`` when not square; a package with
    enumerated ``sizes`` lists them all: ``...-coreml-fp32-512x512+640x640.mlpackage``)."""
    size = str(height) if height == width else f"{height}x{width}"
    if sizes:
        size = "+".join(f"{h}x{w}" for h, w in sizes)
    head = "-backbone" if features_only else ""
    return f"{variant}{head}-{target}-{precision}-{size}{suffix or get_target(target).suffix}"

