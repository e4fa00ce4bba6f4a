"""``nextvit-deploy export --target trt``: the TensorRT-ready ONNX, then (where TensorRT is installed) the engine.

Steps: deploy-form fp32 ONNX -> precision transform in the graph (TensorRT convention, see
:mod:`.precision`) -> static TensorRT-parser compatibility check (:mod:`nextvit_deploy.trt_compat`,
always) -> ``<name>.onnx`` + manifest. With TensorRT and a GPU the engine follows, built strongly
typed from that graph (``<name>.engine`` + ``.build.json`` sidecar + manifest). Without TensorRT,
:class:`EngineNotBuilt` is raised carrying the written ONNX artifact and the equivalent ``trtexec``
command; no engine is claimed.

INT8 with FP16 regions needs fp16 Q/DQ scales, hence opset >= 19: a lower ``--opset`` is raised to 19
and the manifest says so (``details.opset_note``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .._deps import INSTALL_HINTS, require
from ..artifact import Artifact
from ..errors import EngineNotBuilt, MissingDependency
from . import ExportRequest

__all__ = ["export_trt", "trtexec_for"]


def trtexec_for(req: ExportRequest, onnx_path, engine_path) -> str:
    from ..backends.trt_build import trtexec_command

    return trtexec_command(onnx_path, engine_path, precision=req.precision, batch=req.batch,
                           image_size=req.image_size, workspace_gb=req.workspace_gb, timing_cache=req.timing_cache,
                           builder_opt_level=req.builder_opt_level, dynamic_batch=req.dynamic_batch,
                           device=req.device)


def export_trt(req: ExportRequest, *, progress: Callable[[str], None]) -> Artifact:
    """Write the TensorRT-ready ONNX and its manifest, then build the engine if TensorRT is present.

    Returns:
        The engine artifact.

    Raises:
        EngineNotBuilt: TensorRT (or a GPU) is missing; ``.artifact`` is the written ONNX artifact and
            ``.trtexec`` the command that builds the engine elsewhere.
        DeployError: the graph fails the TensorRT compatibility check (a bug; the message says which rule).
    """
    from ..trt_compat import require_trt_compat
    from .onnx import export_fp32_onnx
    from .pipeline import export_stage
    from .transform import apply_precision

    opset_note = None
    if req.effective_opset != req.opset:
        opset_note = (f"opset raised from {req.opset} to {req.effective_opset}: INT8 with FP16 regions needs "
                      "float16 Q/DQ scales (QuantizeLinear/DequantizeLinear-19)")
        progress(opset_note)
        req = dataclasses.replace(req, opset=req.effective_opset)
    onnx_final = req.output_path(suffix=".onnx")
    engine_final = req.output_path(suffix=".engine")
    trtexec = trtexec_for(req, onnx_final, engine_final)
    with export_stage(req, onnx_final) as stage:
        tmp = stage.path
        details = export_fp32_onnx(req, tmp, progress=progress)
        if req.precision != "fp32":
            details["precision_transform"] = apply_precision(tmp, tmp, req, convention="tensorrt", progress=progress)
        progress("checking the graph against TensorRT's ONNX parser rules")
        compat = require_trt_compat(tmp)
        progress(compat.summary())
        details.update({"trt_compat": compat.to_dict(), "trtexec": trtexec, "engine": None,
                        "role": "TensorRT-ready ONNX (precision in the graph; built strongly typed)",
                        "tensorrt_versions": f">= {compat.min_version} (10.x and 11.x, strongly typed)"})
        if opset_note:
            details["opset_note"] = opset_note
        onnx_art = stage.publish(details, target="trt")
    try:
        require("tensorrt", purpose="building the TensorRT engine")
    except MissingDependency:
        raise EngineNotBuilt(
            f"TensorRT is not installed, so no engine was built (the TensorRT-ready ONNX is {onnx_final}); "
            f"install it with: {INSTALL_HINTS['tensorrt']}, or run the trtexec command above on a GPU machine",
            artifact=onnx_art, trtexec=trtexec) from None
    from ..backends.tensorrt import current_environment
    from ..backends.trt_build import BuildOptions, build_engine, write_sidecar_file

    try:
        current_environment(req.device)
    except MissingDependency as exc:
        raise EngineNotBuilt(str(exc), artifact=onnx_art, trtexec=trtexec) from None
    with export_stage(req, engine_final) as stage:
        sidecar = build_engine(onnx_final, stage.path, BuildOptions(
            precision=req.precision, batch=req.batch, image_size=req.image_size, workspace_gb=req.workspace_gb,
            timing_cache=req.timing_cache, builder_opt_level=req.builder_opt_level, rebuild_hint=trtexec,
            device=req.device), progress=progress, write_sidecar=False)
        engine_details = {"onnx": onnx_final.name, "engine": sidecar, "trtexec": trtexec,
                          "precision_transform": details.get("precision_transform"), "trt_compat": compat.to_dict()}
        engine_art = stage.publish(engine_details, target="trt", extra_versions=("tensorrt",))
    write_sidecar_file(engine_final, sidecar)  # beside the published engine (read only with it)
    return engine_art
