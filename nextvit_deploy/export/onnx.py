"""ONNX export of the deploy form: BatchNorms folded, standard-domain operators only, simplified, dynamic
batch on request, a parity check after simplification, atomic writes, manifest last.

Exporter choice: the TorchScript exporter (``dynamo=False``). It handles the one dynamic axis we need
(batch) with ``dynamic_axes``, produces the compact graph TensorRT's parser and onnxsim expect, and
needs no onnxscript; the dynamo exporter is the default in this torch, so the choice is explicit.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._deps import available, require
from ..artifact import Artifact
from ..errors import DeployError
from ..manifest import output_names_for
from . import ExportRequest, build_deploy_model

__all__ = ["STANDARD_DOMAINS", "to_onnx", "graph_facts", "simplify_onnx", "export_onnx", "export_fp32_onnx"]

# Operators outside these domains (com.microsoft contrib ops, custom domains) are runtime-specific.
STANDARD_DOMAINS = ("", "ai.onnx")


def to_onnx(model: torch.nn.Module, path: str | Path, *, image_size: tuple[int, int], batch: int,
            dynamic_batch: bool, opset: int, output_names: tuple[str, ...], input_name: str = "input") -> None:
    """Trace ``model`` to ONNX at ``path`` (no simplification)."""
    h, w = image_size
    dummy = torch.randn(batch, 3, h, w)
    axes = {n: {0: "batch"} for n in (input_name, *output_names)} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (dummy,), str(path), dynamo=False, opset_version=opset,
                          input_names=[input_name], output_names=list(output_names), dynamic_axes=axes,
                          do_constant_folding=True)


def graph_facts(model_proto) -> dict[str, Any]:
    """Operator histogram, non-standard domains and BatchNormalization count of an ONNX graph."""
    ops: dict[str, int] = {}
    foreign = set()
    for node in model_proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        if node.domain not in STANDARD_DOMAINS:
            foreign.add(f"{node.domain}::{node.op_type}")
    return {"op_counts": dict(sorted(ops.items())), "nonstandard_ops": sorted(foreign),
            "batchnorm_nodes": ops.get("BatchNormalization", 0), "nodes": len(model_proto.graph.node)}


def _ort_outputs(model_bytes: bytes, feed: np.ndarray) -> list[np.ndarray]:
    ort = require("onnxruntime", purpose="checking the simplified graph")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: feed})


def simplify_onnx(model_proto, *, check_feeds: list[np.ndarray]) -> tuple[Any, str, list[str]]:
    """Simplify with onnxsim (fallback onnxslim); keep the result only if it stays standard-domain and
    agrees with the input graph on ``check_feeds``. Returns (model, tool used or "none", notes)."""
    notes: list[str] = []
    original = model_proto.SerializeToString()
    candidates: list[tuple[str, Callable]] = []
    if available("onnxsim"):
        def _onnxsim(m):
            import onnxsim

            simplified, ok = onnxsim.simplify(m, check_n=0)
            if not ok:
                raise RuntimeError("onnxsim could not validate the result")
            return simplified
        candidates.append(("onnxsim", _onnxsim))
    if available("onnxslim"):
        def _onnxslim(m):
            import onnxslim

            return onnxslim.slim(m)
        candidates.append(("onnxslim", _onnxslim))
    if not candidates:
        return model_proto, "none", ["no simplifier installed (pip install onnxsim or onnxslim)"]
    for tool, fn in candidates:
        try:
            simplified = fn(model_proto)
        except Exception as exc:  # a simplifier failure is not fatal: try the next one
            notes.append(f"{tool} failed: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        facts = graph_facts(simplified)
        if facts["nonstandard_ops"]:
            notes.append(f"{tool} introduced non-standard ops {facts['nonstandard_ops']}; result discarded")
            continue
        new = simplified.SerializeToString()
        worst = 0.0
        for feed in check_feeds:
            for a, b in zip(_ort_outputs(original, feed), _ort_outputs(new, feed)):
                scale = max(float(np.abs(a).max()), 1e-6)
                worst = max(worst, float(np.abs(a - b).max()) / scale)
        if worst > 1e-5:
            notes.append(f"{tool} changed outputs by {worst:.2e} (relative); result discarded")
            continue
        notes.append(f"{tool}: outputs unchanged (max relative difference {worst:.1e})")
        return simplified, tool, notes
    return model_proto, "none", notes


def export_fp32_onnx(req: ExportRequest, path: Path, *, progress: Callable[[str], None]) -> dict[str, Any]:
    """Write the fp32 deploy-form ONNX of ``req`` to ``path`` (not atomically: callers pass a temp path).

    Returns the facts that go into the manifest's ``details``.
    """
    onnx = require("onnx", purpose="ONNX export")
    fused = build_deploy_model(req, progress=progress)
    names = output_names_for(req.features_only)
    progress(f"tracing to ONNX (opset {req.opset})")
    to_onnx(fused.model, path, image_size=req.image_size, batch=req.batch[1], dynamic_batch=req.dynamic_batch,
            opset=req.opset, output_names=names)
    proto = onnx.load(str(path))
    raw_facts = graph_facts(proto)
    if raw_facts["batchnorm_nodes"]:
        raise DeployError(f"internal: exported graph has {raw_facts['batchnorm_nodes']} BatchNormalization nodes")
    notes: list[str] = []
    tool = "none"
    if req.simplify:
        progress("simplifying")
        h, w = req.image_size
        rng = np.random.default_rng(0)
        feeds = [rng.standard_normal((b, 3, h, w), dtype=np.float32) for b in sorted({req.batch[0], req.batch[2]})]
        proto, tool, notes = simplify_onnx(proto, check_feeds=feeds)
        onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))
    facts = graph_facts(proto)
    return {"fused_batchnorms": fused.folded, "simplifier": tool, "simplify_notes": notes,
            "exporter": "torch.onnx.export(dynamo=False)", **facts}


def export_onnx(req: ExportRequest, *, progress: Callable[[str], None]) -> Artifact:
    """``nextvit-deploy export --target onnx``: fp32 deploy form, or its fp16/int8 transform."""
    from .pipeline import export_stage

    with export_stage(req, req.output_path()) as stage:
        details = export_fp32_onnx(req, stage.path, progress=progress)
        if req.precision != "fp32":
            from .transform import apply_precision

            details["precision_transform"] = apply_precision(stage.path, stage.path, req, convention="onnxruntime",
                                                             progress=progress)
        return stage.publish(details)
